"""The MPI bootstrap: the pure rank layout, then real mpiexec runs (PyPI MPICH, and apt Open MPI).

Every launch runs in its own session with a timeout; afterwards no process of that session may be
left. Tests that kill a rank shorten the heartbeat timeout so recovery is quick.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from helpers import remove_mpich_leftovers, socket_dirs, wait_until

from jobqueue_ms.deploy.leftovers import sweep
from jobqueue_ms.mpi import (
    Role,
    choose_host,
    exit_code_of,
    host_address,
    interface_address,
    main,
    min_world_size,
    role_for,
    single_host_hint,
)

SCRIPTS = Path(__file__).parent / "mpi_scripts"
REPO = Path(__file__).resolve().parents[1]

# ============================================================================ the pure layout

S, C, W = "scheduler", "client", "worker"


@pytest.mark.parametrize(
    ("world", "n", "client_rank", "everywhere", "expected"),
    [
        # default: schedulers first, then the client, then workers
        (4, 1, None, False, [Role(S, 0), Role(C), Role(W, None, True), Role(W, None, True)]),
        (
            6,
            2,
            None,
            False,
            [Role(S, 0), Role(S, 1), Role(C)] + [Role(W, None, True)] * 3,
        ),
        # the client first: schedulers take the next ranks
        (4, 2, 0, False, [Role(C), Role(S, 0), Role(S, 1), Role(W, None, True)]),
        # the client last
        (4, 1, 3, False, [Role(S, 0), Role(W, None, True), Role(W, None, True), Role(C)]),
        # workers everywhere: the smallest world is schedulers + client
        (3, 2, None, True, [Role(S, 0, True), Role(S, 1, True), Role(C, None, True)]),
        (2, 1, None, True, [Role(S, 0, True), Role(C, None, True)]),
    ],
)
def test_role_for_table(world, n, client_rank, everywhere, expected):
    got = [role_for(r, world, n, client_rank, everywhere) for r in range(world)]
    assert got == expected


def test_role_for_service_mode_has_no_client():
    got = [role_for(r, 3, 2, has_client=False) for r in range(3)]
    assert got == [Role(S, 0), Role(S, 1), Role(W, None, True)]
    assert min_world_size(2, has_client=False) == 3
    assert min_world_size(2, workers_everywhere=True, has_client=False) == 2


@pytest.mark.parametrize(
    ("world", "n", "everywhere", "need"), [(3, 2, False, 4), (1, 1, False, 3), (2, 2, True, 3)]
)
def test_role_for_too_small_world_names_the_sizes(world, n, everywhere, need):
    with pytest.raises(ValueError) as info:
        role_for(0, world, n, workers_everywhere=everywhere)
    text = str(info.value)
    assert f"has {world} rank(s)" in text
    assert f"at least {need}" in text
    assert f"mpirun -n {need}" in text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0, "world_size": 4, "n_schedulers": 0}, "n_schedulers=0"),
        ({"rank": 4, "world_size": 4, "n_schedulers": 1}, "rank=4"),
        ({"rank": 0, "world_size": 4, "n_schedulers": 1, "client_rank": 9}, "client_rank=9"),
    ],
)
def test_role_for_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        role_for(**kwargs)


def test_cli_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--no-script"])
    assert info.value.code == 2
    assert "--scheduler-file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])
    assert "give a script" in capsys.readouterr().err


# ============================================================================ where ranks listen


@pytest.mark.parametrize(
    ("hostname_address", "interfaces", "single_host", "expected"),
    [
        # the hostname resolves to a routable address: always that
        ("10.1.2.3", ["127.0.0.1", "10.9.9.9"], False, "10.1.2.3"),
        ("10.1.2.3", [], None, "10.1.2.3"),
        # Debian's 127.0.1.1: keep it when every rank is on this host ...
        ("127.0.1.1", ["127.0.0.1", "10.0.0.5"], True, "127.0.1.1"),
        # ... otherwise (or when nobody says) the first routable interface address
        ("127.0.1.1", ["127.0.0.1", "10.0.0.5", "10.0.0.6"], False, "10.0.0.5"),
        ("127.0.0.1", ["127.0.0.1", "169.254.3.4", "192.0.2.2"], None, "192.0.2.2"),
        # nothing routable: loopback it is
        ("127.0.1.1", ["127.0.0.1"], False, "127.0.1.1"),
        # the hostname does not resolve
        (None, ["127.0.0.1", "10.0.0.5"], False, "10.0.0.5"),
        (None, ["127.0.0.1"], True, "127.0.0.1"),
        (None, [], None, "127.0.0.1"),
    ],
)
def test_choose_host_table(hostname_address, interfaces, single_host, expected):
    assert choose_host(hostname_address, interfaces, single_host) == expected


@pytest.mark.parametrize(
    ("env", "world", "expected"),
    [
        ({"OMPI_COMM_WORLD_LOCAL_SIZE": "6"}, 6, True),
        ({"OMPI_COMM_WORLD_LOCAL_SIZE": "3"}, 6, False),
        ({"MPI_LOCALNRANKS": "4"}, 4, True),
        ({"MPI_LOCALNRANKS": "2"}, 4, False),
        # mpiexec inside a 2-node allocation: hydra's own count wins over SLURM's
        ({"MPI_LOCALNRANKS": "4", "SLURM_STEP_NUM_NODES": "2"}, 4, True),
        ({"SLURM_STEP_NUM_NODES": "1"}, 4, True),
        ({"SLURM_STEP_NUM_NODES": "2"}, 4, False),
        ({}, 4, None),
    ],
)
def test_single_host_hint_table(env, world, expected):
    assert single_host_hint(env, world) is expected


def test_host_address_overrides_come_first():
    env = {"JOBQUEUE_MS_MPI_HOST": "10.7.7.7", "JOBQUEUE_MS_MPI_INTERFACE": "lo"}
    assert host_address("10.1.1.1", "lo", env=env) == "10.1.1.1"
    assert host_address(None, "lo", env=env) == "127.0.0.1"
    assert host_address(None, None, env=env) == "10.7.7.7"
    assert host_address(None, None, env={"JOBQUEUE_MS_MPI_INTERFACE": "lo"}) == "127.0.0.1"


def test_unknown_interface_names_the_known_ones():
    with pytest.raises(ValueError, match=r"interface='nosuch0' does not exist .*lo \(127\.0\.0\.1"):
        interface_address("nosuch0")


@pytest.mark.parametrize(("code", "status"), [(None, 0), (0, 0), (4, 4), (True, 1), ("bye", 1)])
def test_exit_code_of(code, status):
    assert exit_code_of(code) == status


# ============================================================================ real MPI runs


def _session_left(sid: int) -> list[str]:
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getsid(p.pid) == sid:
                out.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])}")
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def _launch(
    cmd: list[str], env: dict[str, str] | None = None, timeout: float = 90
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``cmd`` in its own session; kill the session on timeout; assert nothing is left."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    started = time.time()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd} did not finish within {timeout} s\n{out}\n{err}")
    elapsed = time.monotonic() - t0
    wait_until(
        lambda: not _session_left(proc.pid),
        timeout=15,
        message=lambda: f"processes left after {cmd}: {_session_left(proc.pid)}",
    )
    remove_mpich_leftovers(since=started)  # left when a rank's death aborts an MPICH job
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), elapsed


def _bootstrap(mpi, n: int, *args: str) -> list[str]:
    return [str(mpi.mpiexec), "-n", str(n), str(mpi.python), "-m", "jobqueue_ms.mpi", *args]


# Each rank runs under this bash, which prints the rank's own exit code: mpiexec's code is one
# number for all ranks (hydra's is the largest), which would hide a rank leaving with 0.
RANK_EXIT = 'rc=0; "$@" || rc=$?; echo "RANK ${PMI_RANK:-$OMPI_COMM_WORLD_RANK} EXIT $rc"'


def _rank_exits(mpi, n: int, *rank_cmd: str, timeout: float = 90):
    """Run ``rank_cmd`` on ``n`` ranks; return (process, {rank: exit code})."""
    cmd = [str(mpi.mpiexec), "-n", str(n), "bash", "-c", RANK_EXIT, "rank", *rank_cmd]
    proc, _ = _launch(cmd, timeout=timeout)
    codes = {}
    for line in proc.stdout.splitlines():
        words = line.split()
        if len(words) == 4 and words[0] == "RANK" and words[2] == "EXIT":
            codes[int(words[1])] = int(words[3])
    assert sorted(codes) == list(range(n)), proc.stdout + proc.stderr
    return proc, codes


@pytest.mark.mpi
def test_mpich_six_ranks_two_schedulers_runs_the_script(mpi):
    cmd = _bootstrap(mpi, 6, "--schedulers", "2", str(SCRIPTS / "compute.py"), "300", "--flag")
    proc, elapsed = _launch(cmd)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "SCHEDULERS 2" in lines
    assert "WORKERS 3" in lines
    assert f"SUM {sum(x * x for x in range(300))}" in lines
    pids = int(next(x for x in lines if x.startswith("PIDS ")).split()[1])
    assert 1 <= pids <= 3  # tasks ran in worker ranks (how many share them is the scheduler's)
    assert "ARGV ['300', '--flag']" in lines
    assert "NTHREADS [1]" in lines
    assert "MEMORY_LIMITS [None]" in lines
    print(f"mpiexec -n 6 --schedulers 2: {elapsed:.2f} s")


@pytest.mark.mpi
def test_mpich_workers_everywhere_and_client_rank(mpi):
    cmd = _bootstrap(
        mpi,
        3,
        "--schedulers",
        "2",
        "--client-rank",
        "0",
        "--workers-everywhere",
        "--threads-per-worker",
        "2",
        "--memory-limit",
        "300MiB",
        str(SCRIPTS / "compute.py"),
        "50",
    )
    proc, _ = _launch(cmd)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "WORKERS 3" in lines
    # the bootstrap's options reach every worker, as the schedulers report them
    assert "NTHREADS [2]" in lines
    assert f"MEMORY_LIMITS [{300 * 2**20}]" in lines


@pytest.mark.mpi
@pytest.mark.parametrize(("arg", "code"), [("3", 3), ("raise", 1)])
def test_mpich_failing_script_gives_its_exit_code(mpi, arg, code):
    proc, _ = _launch(_bootstrap(mpi, 4, str(SCRIPTS / "fail.py"), arg))
    assert proc.returncode == code, proc.stderr
    if arg == "raise":
        assert "Traceback" in proc.stderr
        assert "RuntimeError: the script failed on purpose" in proc.stderr


@pytest.mark.mpi
def test_mpich_too_small_world_fails_fast(mpi):
    proc, elapsed = _launch(
        _bootstrap(mpi, 3, "--schedulers", "2", str(SCRIPTS / "fail.py"), "0"), timeout=30
    )
    assert proc.returncode == 2
    assert "the MPI world has 3 rank(s) but the layout needs at least 4" in proc.stderr
    assert proc.stderr.count("layout needs") == 1  # said once (by rank 0), not by every rank
    assert elapsed < 20


@pytest.mark.mpi
@pytest.mark.parametrize(("arg", "code"), [(None, 0), ("4", 4), ("raise", 1)])
def test_mpich_in_script_initialize_every_rank_exits_with_the_script_code(mpi, arg, code):
    """sys.exit(4) / an uncaught exception / success on the client rank: each rank's own code."""
    args = [str(SCRIPTS / "in_script.py"), *([arg] if arg else [])]
    proc, codes = _rank_exits(mpi, 5, str(mpi.python), *args)
    assert "IN_SCRIPT 15" in proc.stdout, proc.stderr
    assert codes == {r: code for r in range(5)}, proc.stderr
    if arg == "raise":
        assert proc.stderr.count("Traceback") == 1  # the client rank's, nobody else's
        assert "RuntimeError: the in-script client failed on purpose" in proc.stderr
    else:
        assert "Traceback" not in proc.stderr


@pytest.mark.mpi
@pytest.mark.parametrize(("arg", "code"), [("0", 0), ("3", 3), ("raise", 1)])
def test_mpich_cli_every_rank_exits_with_the_script_code(mpi, arg, code):
    proc, codes = _rank_exits(
        mpi, 4, str(mpi.python), "-m", "jobqueue_ms.mpi", str(SCRIPTS / "fail.py"), arg
    )
    assert codes == {r: code for r in range(4)}, proc.stderr


@pytest.mark.mpi
def test_mpich_in_script_too_small_world_says_it_once(mpi):
    """initialize(n_schedulers=2) on 3 ranks: one line from rank 0, code 2 on every rank."""
    proc, codes = _rank_exits(mpi, 3, str(mpi.python), str(SCRIPTS / "in_script.py"), timeout=30)
    assert codes == {0: 2, 1: 2, 2: 2}
    assert proc.stderr.count("layout needs at least 4") == 1, proc.stderr
    assert "jobqueue-ms mpi: error: the MPI world has 3 rank(s)" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.mpi
def test_mpich_jobqueue_ms_mpi_command(mpi):
    """The `jobqueue-ms mpi ...` form (the click command) runs the same bootstrap."""
    base = [str(mpi.mpiexec), "-n", "4", str(mpi.python), "-m", "jobqueue_ms", "mpi"]
    proc, _ = _launch([*base, "--schedulers", "2", str(SCRIPTS / "compute.py"), "30"])
    assert proc.returncode == 0, proc.stderr
    assert "SCHEDULERS 2" in proc.stdout.splitlines()
    assert "WORKERS 1" in proc.stdout.splitlines()
    assert f"SUM {sum(x * x for x in range(30))}" in proc.stdout.splitlines()
    proc, _ = _launch([*base, str(SCRIPTS / "fail.py"), "3"])
    assert proc.returncode == 3, proc.stderr
    proc, _ = _launch([*base, "--schedulers", "3", str(SCRIPTS / "fail.py"), "0"], timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.count("jobqueue-ms mpi: error: the MPI world has 4 rank(s)") == 1


@pytest.mark.mpi
def test_mpich_unknown_interface_fails_with_one_message(mpi):
    proc, _ = _launch(
        _bootstrap(mpi, 3, "--interface", "nosuch0", str(SCRIPTS / "fail.py"), "0"), timeout=30
    )
    assert proc.returncode == 1
    assert proc.stderr.count("jobqueue-ms mpi: error: startup failed") == 1, proc.stderr
    assert "interface='nosuch0' does not exist" in proc.stderr


@pytest.mark.mpi
def test_mpich_address_from_env_and_interface_option(mpi):
    """$JOBQUEUE_MS_MPI_HOST sets where every rank listens; --interface (per rank) wins."""
    env = {"JOBQUEUE_MS_MPI_HOST": "127.0.0.3"}
    script = [str(SCRIPTS / "compute.py"), "5"]
    proc, _ = _launch(_bootstrap(mpi, 3, *script), env=env)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^ADDRESSES tcp://127\.0\.0\.3:\d+$", proc.stdout, re.M), proc.stdout
    assert "WORKER_HOSTS ['127.0.0.3']" in proc.stdout.splitlines()
    proc, _ = _launch(_bootstrap(mpi, 3, "--interface", "lo", *script), env=env)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^ADDRESSES tcp://127\.0\.0\.1:\d+$", proc.stdout, re.M), proc.stdout
    assert "WORKER_HOSTS ['127.0.0.1']" in proc.stdout.splitlines()


@pytest.mark.mpi
def test_mpich_kill_worker_rank_aborts_the_job_without_hanging(mpi, tmp_path):
    """Hydra (PyPI MPICH 5) kills every rank when one dies, even with -disable-auto-cleanup.

    So under MPICH a crashed worker rank ends the job quickly with a non-zero code (no hang and
    nothing left behind). Surviving a dead rank needs Open MPI with --enable-recovery (below).
    """
    cmd = [str(mpi.mpiexec), "-disable-auto-cleanup", *_bootstrap(mpi, 6, "--schedulers", "2")[1:]]
    cmd.append(str(SCRIPTS / "kill_worker.py"))
    record = tmp_path / "killed"
    env = {"JOBQUEUE_MS_HEARTBEAT_TIMEOUT": "3", "JQMS_TEST_KILL_RECORD": str(record)}
    before = socket_dirs()
    proc, elapsed = _launch(cmd, env=env, timeout=60)
    left = socket_dirs() - before  # every rank was SIGKILLed: none could remove its own
    assert left and {Path(p) for p in sweep()} >= left  # what the next cluster here does first
    assert not socket_dirs() - before
    # The kill happened: the client rank's "KILLED" line may be lost (hydra kills the rank before
    # forwarding it) and hydra's own words vary ("Killed (signal 9)", or a proxy's broken pipe
    # first), so the script also leaves the victim's pid in a file.
    victim = int(record.read_text())
    assert not psutil.pid_exists(victim)
    assert "DONE" not in proc.stdout
    assert proc.returncode != 0
    assert elapsed < 45


@pytest.mark.mpi
@pytest.mark.parametrize("how", ["admin", "sigterm"])
def test_mpich_service_mode_until_admin_shutdown_or_sigterm(mpi, tmp_path, how):
    from jobqueue_ms.runtime.admin import SchedulerAdmin
    from jobqueue_ms.runtime.client import Client

    sfile = tmp_path / "scheduler.json"
    cmd = _bootstrap(mpi, 4, "--schedulers", "2", "--no-script", "--scheduler-file", str(sfile))
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        wait_until(sfile.exists, timeout=30, message="no scheduler file")
        data = json.loads(sfile.read_text())
        assert len(data["addresses"]) == 2
        # the keys rank 0 made are beside the scheduler file, private, and named by it
        keyfile = Path(data["keyfile"])
        assert data["security"] == "curve" and keyfile == Path(f"{sfile}.keys")
        assert keyfile.stat().st_mode & 0o777 == 0o600
        assert "secret" not in sfile.read_text()
        with Client(scheduler_file=str(sfile)) as c:
            assert list(c.map(abs, range(-20, 0))) == list(range(20, 0, -1))
        admin = SchedulerAdmin(data["addresses"], security=str(keyfile))
        wait_until(
            lambda: all(len(i["workers"]) == 2 for i in admin.info()),
            timeout=30,
            message="both worker ranks on both schedulers",
        )
        admin.close()
        if how == "admin":
            admin = SchedulerAdmin(data["addresses"], security=str(keyfile))
            admin.shutdown(data["addresses"][1])  # one admin shutdown stops the whole service
            admin.close()
        else:
            proc.send_signal(signal.SIGTERM)  # what scancel does: the launcher forwards it
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, err
    assert "schedulers at" in out
    assert not sfile.exists()  # it listed addresses nobody listens on any more
    assert not keyfile.exists()
    wait_until(lambda: not _session_left(proc.pid), timeout=15)


# ============================================================================ Open MPI (apt)


def _openmpi() -> str | None:
    """Open MPI's launcher. Plain ``mpirun`` is not enough: with the venv first on PATH (as the
    tests run) it is PyPI MPICH's hydra, and every Open MPI test would silently skip."""
    for name in ("mpirun.openmpi", "/usr/bin/mpirun", "mpirun"):
        mpirun = shutil.which(name)
        if mpirun is None:
            continue
        try:
            version = subprocess.run(
                [mpirun, "--version"], capture_output=True, text=True, timeout=20
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "Open MPI" in version or "OpenRTE" in version:
            return mpirun
    return None


OPENMPI = _openmpi()
OPENMPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
    # the mpi4py wheel carries MPICH and Open MPI builds; pick the one matching mpirun
    "MPI4PY_MPIABI": "openmpi",
}
needs_openmpi = pytest.mark.skipif(OPENMPI is None, reason="Open MPI mpirun is not installed")


def test_open_mpi_is_found_when_installed():
    """Guard against the Open MPI tests skipping because PATH finds MPICH's mpirun first."""
    if not os.path.exists("/usr/bin/orterun") and shutil.which("mpirun.openmpi") is None:
        pytest.skip("Open MPI is not installed here")
    assert OPENMPI is not None


@pytest.mark.mpi
@needs_openmpi
def test_openmpi_six_ranks_two_schedulers(mpi):
    cmd = [OPENMPI, "-n", "6", str(mpi.python), "-m", "jobqueue_ms.mpi", "--schedulers", "2"]
    proc, elapsed = _launch([*cmd, str(SCRIPTS / "compute.py"), "100"], env=OPENMPI_ENV)
    assert proc.returncode == 0, proc.stderr
    assert "WORKERS 3" in proc.stdout.splitlines()
    assert f"SUM {sum(x * x for x in range(100))}" in proc.stdout.splitlines()
    print(f"Open MPI mpirun -n 6 --schedulers 2: {elapsed:.2f} s")
    proc, _ = _launch([*cmd, str(SCRIPTS / "fail.py"), "5"], env=OPENMPI_ENV)
    assert proc.returncode == 5


@pytest.mark.mpi
@needs_openmpi
def test_openmpi_killed_worker_rank_is_survived_with_enable_recovery(mpi):
    cmd = [OPENMPI, "--enable-recovery", "-n", "6", str(mpi.python), "-m", "jobqueue_ms.mpi"]
    cmd += ["--schedulers", "2", str(SCRIPTS / "kill_worker.py")]
    env = {**OPENMPI_ENV, "JOBQUEUE_MS_HEARTBEAT_TIMEOUT": "3"}
    before = socket_dirs()
    proc, _ = _launch(cmd, env=env, timeout=90)
    assert "KILLED" in proc.stdout
    assert f"DONE {sum(i * i for i in range(120))}" in proc.stdout, proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert not socket_dirs() - before  # the survivors removed the killed rank's directory


@pytest.mark.mpi
@needs_openmpi
def test_openmpi_killed_scheduler_rank_is_survived_with_enable_recovery(mpi):
    """One of 2 scheduler ranks SIGKILLed mid-run: the client fails over, the work completes."""
    cmd = [OPENMPI, "--enable-recovery", "-n", "6", str(mpi.python), "-m", "jobqueue_ms.mpi"]
    cmd += ["--schedulers", "2", str(SCRIPTS / "kill_scheduler.py")]
    env = {**OPENMPI_ENV, "JOBQUEUE_MS_HEARTBEAT_TIMEOUT": "3"}
    proc, _ = _launch(cmd, env=env, timeout=90)
    assert "KILLED SCHEDULER" in proc.stdout, proc.stderr
    assert f"DONE {sum(i * i for i in range(120))}" in proc.stdout, proc.stderr
    assert proc.returncode == 0, proc.stderr
