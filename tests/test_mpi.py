"""The MPI bootstrap: the pure rank layout, then real mpiexec runs (PyPI MPICH, and apt Open MPI).

Every launch runs in its own session with a timeout; afterwards no process of that session may be
left. Tests that kill a rank shorten the heartbeat timeout so recovery is quick.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from helpers import wait_until

from jobqueue_ms.mpi import Role, main, min_world_size, role_for

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
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), elapsed


def _bootstrap(mpi, n: int, *args: str) -> list[str]:
    return [str(mpi.mpiexec), "-n", str(n), str(mpi.python), "-m", "jobqueue_ms.mpi", *args]


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
        str(SCRIPTS / "compute.py"),
        "50",
    )
    proc, _ = _launch(cmd)
    assert proc.returncode == 0, proc.stderr
    assert "WORKERS 3" in proc.stdout.splitlines()


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
def test_mpich_in_script_initialize(mpi):
    proc, _ = _launch([str(mpi.mpiexec), "-n", "5", str(mpi.python), str(SCRIPTS / "in_script.py")])
    assert proc.returncode == 0, proc.stderr
    assert "IN_SCRIPT 15" in proc.stdout
    proc, _ = _launch(
        [str(mpi.mpiexec), "-n", "5", str(mpi.python), str(SCRIPTS / "in_script.py"), "4"]
    )
    assert proc.returncode == 4, proc.stderr


@pytest.mark.mpi
def test_mpich_kill_worker_rank_aborts_the_job_without_hanging(mpi):
    """Hydra (PyPI MPICH 5) kills every rank when one dies, even with -disable-auto-cleanup.

    So under MPICH a crashed worker rank ends the job quickly with a non-zero code (no hang and
    nothing left behind). Surviving a dead rank needs Open MPI with --enable-recovery (below).
    """
    cmd = [str(mpi.mpiexec), "-disable-auto-cleanup", *_bootstrap(mpi, 6, "--schedulers", "2")[1:]]
    cmd.append(str(SCRIPTS / "kill_worker.py"))
    proc, elapsed = _launch(cmd, env={"JOBQUEUE_MS_HEARTBEAT_TIMEOUT": "3"}, timeout=60)
    # the client rank's own "KILLED" line may be lost: hydra kills it before forwarding output
    assert "Killed (signal 9)" in proc.stdout + proc.stderr
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
        with Client(scheduler_file=str(sfile)) as c:
            assert list(c.map(abs, range(-20, 0))) == list(range(20, 0, -1))
        admin = SchedulerAdmin(data["addresses"])
        wait_until(
            lambda: all(len(i["workers"]) == 2 for i in admin.info()),
            timeout=30,
            message="both worker ranks on both schedulers",
        )
        admin.close()
        if how == "admin":
            admin = SchedulerAdmin(data["addresses"])
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
    wait_until(lambda: not _session_left(proc.pid), timeout=15)


# ============================================================================ Open MPI (apt)


def _openmpi() -> str | None:
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        return None
    try:
        version = subprocess.run(
            [mpirun, "--version"], capture_output=True, text=True, timeout=20
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return mpirun if "Open MPI" in version or "OpenRTE" in version else None


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
    proc, _ = _launch(cmd, env=env, timeout=90)
    assert "KILLED" in proc.stdout
    assert f"DONE {sum(i * i for i in range(120))}" in proc.stdout, proc.stderr
    assert proc.returncode == 0, proc.stderr
