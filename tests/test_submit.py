"""`jobqueue-ms submit`: golden job scripts, bad input, and real runs of the MPI bootstrap.

- Goldens: ``--dry-run`` output for every system, byte for byte against
  ``tests/golden/submit/<system>/<case>.sh`` (rewrite with ``scripts/update-goldens``), and
  ``bash -n``. The job runs in a temporary directory whose path is printed in the script; it is
  written as ``/home/me/project`` in the goldens (the only substitution).
- Bad input: one line on stderr naming the option, exit code 2, and no queue command run.
- Real runs, each as a real ``jobqueue-ms submit --wait`` process: the real SLURM (3 emulated
  nodes of 2 CPUs, ci/slurm/start) and the real SGE (PE ``smp``, 2 slots, ci/sge/start) with the
  venv's PyPI MPICH; PBS through the slurm-wlm-torque shim over SLURM, and LSF through the
  ci/lsf stand-in (both stand-ins, not the real systems). Every job is cancelled by name in a
  finalizer and must leave its queue; no process of the job may be left.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner
from helpers import remove_mpich_leftovers, run, socket_dirs, sweep_socket_dirs, wait_until

from jobqueue_ms.batch.base import BatchCluster
from jobqueue_ms.cli import main
from jobqueue_ms.config import Config, get_config
from jobqueue_ms.submit import SubmitError, build_spec, render_submit_script

GOLDEN = Path(__file__).parent / "golden" / "submit"
UPDATE = os.environ.get("UPDATE_GOLDENS") == "1"
PROJECT = "/home/me/project"  # stands for the test's directory in the goldens
PY = "/opt/venv/bin/python"  # no mpiexec beside it, so the scripts call plain `mpiexec`
SUBMIT_TIMEOUT_S = 240

# (system, case) -> command-line options (the script is work.py with the arguments below).
COMMON = ["--python", PY, "--log-directory", "/scratch/logs"]
CASES: dict[tuple[str, str], list[str]] = {
    ("slurm", "basic"): [
        *["--nodes", "2", "--tasks-per-node", "4", "--schedulers", "2"],
        *["--walltime", "00:20:00"],
    ],
    ("slurm", "full"): [
        *["--nodes", "3", "--tasks-per-node", "4", "--cpus-per-task", "2", "--schedulers", "2"],
        *["--walltime", "1-00:00:00", "--memory", "64GiB", "--memory-limit", "7GiB"],
        *["--queue", "normal", "--account", "proj42", "--job-name", "mpi-full"],
        *["--launcher", "srun", "--launcher-arg=--mpi=pmi2", "--launcher-arg", "--cpu-bind=none"],
        *["--prologue", "module load mpich", "--prologue", "export OMP_NUM_THREADS=1"],
        *["--workers-everywhere", "--interface", "ib0"],
    ],
    ("sge", "basic"): [
        *["--nodes", "2", "--tasks-per-node", "4", "--schedulers", "2"],
        *["--walltime", "00:20:00"],
    ],
    ("sge", "full"): [
        *["--nodes", "2", "--tasks-per-node", "4", "--cpus-per-task", "2", "--pe", "mpi"],
        *["--memory", "32GiB", "--walltime", "02:00:00", "--queue", "all.q", "--account", "p"],
        *["--launcher", "mpirun", "--prologue", "module load openmpi"],
    ],
    ("pbs", "pro"): [
        *["--nodes", "2", "--tasks-per-node", "4", "--schedulers", "2", "--memory", "100GB"],
        *["--walltime", "00:20:00", "--queue", "workq", "--account", "proj42"],
    ],
    ("pbs", "torque"): [
        *["--pbs-flavor", "torque", "--nodes", "2", "--tasks-per-node", "4"],
        *["--memory", "16GiB", "--walltime", "00:20:00"],
    ],
    ("lsf", "basic"): [
        *["--nodes", "2", "--tasks-per-node", "4", "--schedulers", "2"],
        *["--walltime", "00:20:00", "--memory", "8GiB"],
    ],
    ("lsf", "one-host"): [
        *["--tasks-per-node", "8", "--schedulers", "3", "--queue", "short", "--account", "p"],
        *["--memory-limit", "2GB"],
    ],
}
SCRIPT_ARGS = ["--steps", "10", "a b"]

# Run by the bootstrap in the real-queue tests: compute, check, report, exit with argv[1].
WORK = '''\
"""Square numbers on the cluster; write the results; exit with the code given."""
import json
import os
import sys

from jobqueue_ms.mpi import client, scheduler_addresses


def square(x):
    return x * x


def node(_):
    return os.environ.get("SLURMD_NODENAME") or os.uname().nodename


c = client()
results = list(c.map(square, range(100)))
assert results == [x * x for x in range(100)]
report = {
    "sum": sum(results),
    "schedulers": len(scheduler_addresses()),
    "worker_nodes": sorted(set(c.map(node, range(40)))),
    "client_node": node(0),
    "slurm_nodes": os.environ.get("SLURM_JOB_NUM_NODES"),
}
with open("report.json", "w") as f:
    json.dump(report, f)
print("REPORT", json.dumps(report), flush=True)
sys.exit(int(sys.argv[1]))
'''


@pytest.fixture(autouse=True)
def no_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No site or user config file and no JOBQUEUE_MS_* setting, unless a test sets one."""
    for name in list(os.environ):
        if name.startswith("JOBQUEUE_MS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("JOBQUEUE_MS_CONFIG", str(tmp_path / "no-user-config.toml"))
    monkeypatch.setenv("JOBQUEUE_MS_SITE_CONFIG", str(tmp_path / "no-site-config.toml"))
    monkeypatch.delenv("LSF_ENVDIR", raising=False)  # lsf_units: LSF's default, KB
    get_config.cache_clear()
    yield
    get_config.cache_clear()


def cli(args: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    """Run ``jobqueue-ms submit ARGS`` in-process from ``cwd``: (exit code, stdout, stderr)."""
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(main, ["submit", *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


# ============================================================================ goldens


@pytest.mark.parametrize(("system", "case"), sorted(CASES), ids="/".join)
def test_dry_run_golden(system, case, tmp_path, monkeypatch):
    (tmp_path / "work.py").write_text("print('hi')\n")
    args = ["--system", system, *COMMON, *CASES[system, case], "--dry-run"]
    code, out, err = cli([*args, "work.py", *SCRIPT_ARGS], tmp_path, monkeypatch)
    assert (code, err) == (0, "")
    rendered = out.replace(str(tmp_path.resolve()), PROJECT)
    path = GOLDEN / system / f"{case}.sh"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rendered)
    assert path.read_text() == rendered, f"{path} differs; run scripts/update-goldens to review"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_every_submit_golden_is_valid_bash_and_has_a_case():
    paths = sorted(GOLDEN.glob("*/*.sh"))
    assert {(p.parent.name, p.stem) for p in paths} == set(CASES)
    for path in paths:
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{path}: {proc.stderr}"


@pytest.mark.parametrize("system", ["slurm", "sge", "pbs", "lsf"])
def test_exit_file_sits_next_to_the_output_named_like_it(system, tmp_path, monkeypatch):
    """The job script writes the exit code where SubmittedJob.exit_path looks for it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work.py").write_text("")
    spec = build_spec(system, tmp_path / "work.py", tasks_per_node=3, config=Config())
    script = render_submit_script(spec)
    (line,) = [x for x in script.splitlines() if x.startswith("exit_file=")]
    written = re.sub(r"\$\{(SLURM_JOB_ID|JOB_ID|LSB_JOBID)\}", "123", line[len("exit_file=") :])
    cls = BatchCluster.for_system(system)
    output = tmp_path / cls.log_name.format(name="jqms-work", job_id="123", index=0)
    assert written.strip('"') == str(output.with_suffix(".exit"))
    assert spec.job.log_directory == str(tmp_path)  # the submit directory, absolute


def test_the_launcher_beside_the_interpreter_is_called_by_its_path(tmp_path):
    (tmp_path / "work.py").write_text("")
    spec = build_spec("slurm", tmp_path / "work.py", config=Config())
    assert spec.job.python == sys.executable
    beside = Path(sys.executable).parent / "mpiexec"
    assert spec.launcher_command == (str(beside) if beside.exists() else "mpiexec")
    srun = build_spec("slurm", tmp_path / "work.py", launcher="srun", config=Config())
    assert srun.launcher_command == "srun"


def test_config_sections_supply_defaults_and_options_win(tmp_path, monkeypatch):
    (tmp_path / "work.py").write_text("")
    (tmp_path / "config.toml").write_text(
        "[slurm]\n"
        'queue = "debug"\n'
        'account = "proj"\n'
        'memory = "2GiB"\n'
        "cores = 8            # the worker jobs' option: not this command's\n"
        'job_script_prologue = ["module load mpich"]\n'
        "[mpi]\n"
        "tasks_per_node = 4\n"
        "schedulers = 2\n"
        'launcher = "srun"\n'
        'launcher_args = ["--mpi=pmi2"]\n'
    )
    monkeypatch.setenv("JOBQUEUE_MS_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setenv("JOBQUEUE_MS_SLURM_WALLTIME", "00:30:00")
    get_config.cache_clear()
    code, out, err = cli(
        ["--system", "slurm", "--queue", "long", "--dry-run", "work.py"], tmp_path, monkeypatch
    )
    assert (code, err) == (0, "")
    directives = [line for line in out.splitlines() if line.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH --job-name=jqms-work",
        f"#SBATCH --output={tmp_path.resolve()}/%x-%j.out",
        "#SBATCH --partition=long",
        "#SBATCH --account=proj",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --mem=2048M",
        "#SBATCH --time=00:30:00",
    ]
    assert "module load mpich" in out.splitlines()
    launch = out.split("status=0\n", 1)[1].splitlines()[0]
    assert launch == "srun --cpus-per-task=1 --mpi=pmi2 \\"


# ============================================================================ bad input

BAD_INPUT = [
    # (options, script, the message must contain each of these)
    (["--system", "slurm", "--nodes", "0"], "work.py", ["nodes=", "0", "at least 1"]),
    (["--system", "slurm", "--walltime", "soon"], "work.py", ["walltime='soon'", "HH:MM:SS"]),
    (["--system", "condor"], "work.py", ["system='condor'", "slurm, sge, pbs, lsf"]),
    ([], "work.py", ["--system", "slurm, sge, pbs, lsf"]),
    (["--system", "sge"], "missing.py", ["script='missing.py'", "no such file"]),
    (["--system", "sge"], None, ["script is missing", "my_script.py"]),
    (["--system", "lsf", "--tasks-per-node", "x"], "work.py", ["tasks_per_node='x'", "whole"]),
    (
        ["--system", "slurm", "--tasks-per-node", "3", "--schedulers", "2"],
        "work.py",
        ["3 MPI rank(s)", "at least 4", "--tasks-per-node"],
    ),
    (["--system", "pbs", "--launcher", "aprun"], "work.py", ["launcher='aprun'", "mpiexec"]),
    (["--system", "sge", "--launcher", "srun"], "work.py", ["launcher='srun'", "SLURM"]),
    (["--system", "slurm", "--memory", "lots"], "work.py", ["memory='lots'", "GiB"]),
    (["--system", "slurm", "--pe", "mpi"], "work.py", ["pe='mpi'", "slurm"]),
    (["--system", "pbs", "--pbs-flavor", "moab"], "work.py", ["pbs_flavor='moab'", "torque"]),
    (["--system", "slurm", "--queue", "a b"], "work.py", ["queue='a b'", "single word"]),
    (["--system", "slurm", "--workdir", "/nonexistent"], "work.py", ["workdir=", "directory"]),
]


@pytest.fixture
def queue_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fake sbatch/qsub/bsub first on PATH that only record being called; returns the record."""
    record = tmp_path / "called"
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    for command in ("sbatch", "qsub", "bsub"):
        path = bin_dir / command
        path.write_text(f'#!/bin/sh\necho "{command} $*" >> "{record}"\necho 1\n')
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return record


@pytest.mark.parametrize(
    ("options", "script", "needles"), BAD_INPUT, ids=[" ".join(c[0]) or "none" for c in BAD_INPUT]
)
def test_bad_input_is_one_line_and_submits_nothing(
    options, script, needles, tmp_path, monkeypatch, queue_commands
):
    (tmp_path / "work.py").write_text("")
    args = [*options, *([script] if script else [])]
    code, out, err = cli(args, tmp_path, monkeypatch)
    assert code == 2
    assert out == ""
    assert err.startswith("jobqueue-ms submit: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not queue_commands.exists()


def test_unknown_mpi_config_key_names_its_file(tmp_path, monkeypatch, queue_commands):
    (tmp_path / "work.py").write_text("")
    (tmp_path / "config.toml").write_text("[mpi]\ntask_per_node = 4\n")
    monkeypatch.setenv("JOBQUEUE_MS_CONFIG", str(tmp_path / "config.toml"))
    get_config.cache_clear()
    code, _, err = cli(["--system", "slurm", "work.py"], tmp_path, monkeypatch)
    assert code == 2
    assert str(tmp_path / "config.toml") in err and "'task_per_node'" in err
    assert not queue_commands.exists()


def test_a_refused_submission_is_one_line_and_exit_code_1(tmp_path, monkeypatch):
    """sbatch failing (bad account, controller down...) ends in its message, not a traceback."""
    (tmp_path / "work.py").write_text("")
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        "#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Invalid account' >&2\n"
        "exit 1\n"
    )
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    code, out, err = cli(
        ["--system", "slurm", "--account", "nope", "work.py"], tmp_path, monkeypatch
    )
    assert (code, out) == (1, "")
    assert err.count("\n") == 1, err
    assert err.startswith("jobqueue-ms submit: error: `sbatch --parsable ")
    assert "exited with code 1; stderr: sbatch: error: Batch job submission failed" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("variable", "value", "rendered"),
    [
        ("JOBQUEUE_MS_MPI_INTERFACE", "lo", " --interface lo "),
        ("JOBQUEUE_MS_MPI_HOST", "10.0.0.5", " --host 10.0.0.5 "),
    ],
)
def test_where_ranks_listen_comes_from_the_mpi_settings(
    variable, value, rendered, tmp_path, monkeypatch
):
    """$JOBQUEUE_MS_MPI_HOST/_INTERFACE are [mpi] settings: rendered, not refused as unknown."""
    (tmp_path / "work.py").write_text("")
    monkeypatch.setenv(variable, value)
    get_config.cache_clear()
    code, out, err = cli(["--system", "slurm", "--dry-run", "work.py"], tmp_path, monkeypatch)
    assert (code, err) == (0, "")
    assert rendered in out


def test_build_spec_raises_submit_error(tmp_path):
    (tmp_path / "work.py").write_text("")
    with pytest.raises(SubmitError, match=r"schedulers=0 must be at least 1"):
        build_spec("slurm", tmp_path / "work.py", schedulers=0, config=Config())


# ============================================================================ real queues


# The emulated SLURM nodes are all this machine: keep every rank on loopback (the default would
# pick a routable interface for a world that spans several nodes, see docs/mpi.md). The [mpi]
# setting renders `--interface lo` into the job script.
LOOPBACK = {"JOBQUEUE_MS_MPI_INTERFACE": "lo"}


def submit_process(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a real ``jobqueue-ms submit`` process (the venv's interpreter) from ``cwd``."""
    full_env = {**os.environ, **LOOPBACK, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "jobqueue_ms", "submit", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=SUBMIT_TIMEOUT_S,
        check=False,
    )


def job_processes(marker: str) -> list[str]:
    """Live processes whose command line mentions ``marker`` (the test's own directory)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any(marker in part for part in proc.info["cmdline"] or []):
            found.append(f"{proc.info['pid']}: {' '.join(proc.info['cmdline'])[:120]}")
    return found


@pytest.fixture
def job_name(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A unique job name; whatever job carries it is cancelled at teardown and must leave.

    Also checks that no process of the test's job (its command line names tmp_path) is left.
    """
    name = f"jqms-t{uuid.uuid4().hex[:8]}"
    yield name
    uses = set(request.fixturenames)
    if "slurm" in uses:  # SLURM, and the PBS shim over it
        run(["scancel", "--name", name], check=False)

        def gone() -> bool:
            out = run(["squeue", "--noheader", "--name", name, "--format=%i"], check=False)
            return out.returncode == 0 and not out.stdout.strip()

        wait_until(gone, timeout=60, interval=0.2, message=f"SLURM job {name} to leave")
    if "lsf_standin" in uses:  # its PATH is still in place: monkeypatch undoes it later
        run(["bkill", "0"], check=False)
    if "sge" in uses:
        run(["qdel", name], check=False)
        wait_until(
            lambda: name not in run(["qstat", "-u", "*"], check=False).stdout,
            timeout=60,
            interval=0.2,
            message=f"SGE job {name} to leave",
        )
    wait_until(
        lambda: not job_processes(str(tmp_path)),
        timeout=30,
        interval=0.2,
        message=lambda: f"the job's processes to end: {job_processes(str(tmp_path))}",
    )


def report(result: subprocess.CompletedProcess[str]) -> dict:
    """The script's REPORT line from the job output that --wait printed."""
    import json

    lines = [x for x in result.stdout.splitlines() if x.startswith("REPORT ")]
    assert len(lines) == 1, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return json.loads(lines[0][len("REPORT ") :])


def check_finished(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The command exited ``code``, printed the job id first and said how the job ended."""
    assert result.returncode == code, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    job_id = result.stdout.splitlines()[0]
    assert re.fullmatch(r"\d+", job_id), result.stdout
    assert result.stderr.splitlines()[-1].endswith(f"script exit code {code}"), result.stderr
    return job_id


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "work.py").write_text(WORK)
    return tmp_path / "work.py"


FAST_POLL = {f"JOBQUEUE_MS_{s}_POLL_INTERVAL": "0.5" for s in ("SLURM", "SGE", "PBS", "LSF")}


@pytest.mark.slow
def test_slurm_two_nodes_two_schedulers_wait(slurm, mpi, job_name, work, tmp_path):
    """The issue's example on the real SLURM: results right, the script's exit code back."""
    args = ["--system", "slurm", "--nodes", "2", "--tasks-per-node", "2", "--schedulers", "2"]
    args += ["--walltime", "00:05:00", "--job-name", job_name, "--wait"]
    args += ["--prologue", 'echo "BATCH_NODE $SLURMD_NODENAME"']
    result = submit_process([*args, str(work), "0"], tmp_path, FAST_POLL)
    job_id = check_finished(result, 0)
    got = report(result)
    assert got["sum"] == sum(x * x for x in range(100))
    assert got["schedulers"] == 2
    assert got["slurm_nodes"] == "2"
    assert set(got["worker_nodes"]) | {got["client_node"]} <= set(slurm.nodes)
    # Ranks 0-1 (schedulers) fill the first node, where the batch script runs; rank 2 (the
    # client) and rank 3 (the worker) are on the second: the ranks span both nodes.
    (batch_node,) = re.findall(r"^BATCH_NODE (\S+)$", result.stdout, flags=re.MULTILINE)
    assert got["client_node"] != batch_node
    assert got["worker_nodes"] == [got["client_node"]]
    assert (tmp_path / f"{job_name}-{job_id}.exit").read_text() == "0\n"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["mpiexec", "srun"])
def test_slurm_failing_script_gives_its_exit_code(slurm, mpi, job_name, work, tmp_path, launcher):
    args = ["--system", "slurm", "--nodes", "2", "--tasks-per-node", "2", "--schedulers", "2"]
    args += ["--launcher", launcher, "--job-name", job_name, "--wait"]
    if launcher == "srun":
        args.append("--launcher-arg=--mpi=pmi2")  # PyPI MPICH speaks PMI-2 to slurmstepd
    result = submit_process([*args, str(work), "3"], tmp_path, FAST_POLL)
    check_finished(result, 3)
    assert report(result)["sum"] == sum(x * x for x in range(100))
    assert "FAILED, script exit code 3" in result.stderr


@pytest.mark.slow
def test_slurm_submit_without_wait_prints_the_id_only(slurm, mpi, job_name, work, tmp_path):
    args = ["--system", "slurm", "--nodes", "2", "--tasks-per-node", "2", "--schedulers", "1"]
    result = submit_process([*args, "--job-name", job_name, str(work), "5"], tmp_path)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    assert re.fullmatch(r"\d+", job_id), result.stdout
    exit_file = tmp_path / f"{job_name}-{job_id}.exit"
    wait_until(exit_file.exists, timeout=120, interval=0.2, message=f"{exit_file}")
    assert exit_file.read_text() == "5\n"
    assert report_file(tmp_path)["schedulers"] == 1


def report_file(directory: Path) -> dict:
    import json

    return json.loads((directory / "report.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("code", [0, 4])
def test_sge_parallel_environment_wait(sge, mpi, job_name, work, tmp_path, code):
    """Real SGE, ``-pe smp 2`` (the CI queue has 2 slots): 1 scheduler, workers on both ranks."""
    args = ["--system", "sge", "--tasks-per-node", "2", "--schedulers", "1"]
    args += ["--workers-everywhere", "--pe", sge.parallel_environment, "--walltime", "00:05:00"]
    args += ["--job-name", job_name, "--wait"]
    result = submit_process([*args, str(work), str(code)], tmp_path, FAST_POLL)
    job_id = check_finished(result, code)
    got = report(result)
    assert got["sum"] == sum(x * x for x in range(100))
    assert got["schedulers"] == 1
    assert (tmp_path / f"{job_name}-{job_id}.exit").read_text() == f"{code}\n"
    assert f"#$ -pe {sge.parallel_environment} 2" in (tmp_path / f"{job_name}.sh").read_text()


@pytest.mark.slow
def test_pbs_shim_torque_wait(pbs_shim, slurm, mpi, job_name, work, tmp_path):
    """PBS through the slurm-wlm-torque shim over SLURM (not a real PBS server).

    The shim's qsub overrides ``#PBS -o`` (the output lands in ``<script>.o<id>`` in the submit
    directory), so the results are checked in the file the script writes; the exit code still
    comes back through the exit file. The shim's qstat has no ``-x``: the Torque flavour.
    """
    args = ["--system", "pbs", "--pbs-flavor", "torque", "--nodes", "2", "--tasks-per-node", "2"]
    args += ["--schedulers", "2", "--walltime", "00:05:00", "--job-name", job_name, "--wait"]
    result = submit_process([*args, str(work), "6"], tmp_path, FAST_POLL)
    check_finished(result, 6)
    got = report_file(tmp_path)
    assert got["sum"] == sum(x * x for x in range(100))
    assert got["slurm_nodes"] == "2"
    assert (tmp_path / f"{job_name}.exit").read_text() == "6\n"


@pytest.mark.slow
@pytest.mark.parametrize("code", [0, 7])
def test_lsf_standin_wait(lsf_standin, mpi, job_name, work, tmp_path, code):
    """LSF through the ci/lsf stand-in (one emulated host, 4 slots; not a real LSF)."""
    args = ["--system", "lsf", "--tasks-per-node", "4", "--schedulers", "2"]
    args += ["--walltime", "00:05:00", "--job-name", job_name, "--wait"]
    result = submit_process([*args, str(work), str(code)], tmp_path, FAST_POLL)
    job_id = check_finished(result, code)
    got = report(result)
    assert got["sum"] == sum(x * x for x in range(100))
    assert got["schedulers"] == 2
    assert (tmp_path / f"{job_name}-{job_id}.exit").read_text() == f"{code}\n"


@pytest.mark.slow
def test_slurm_cancelled_job_ends_wait_with_exit_code_1(slurm, mpi, job_name, tmp_path):
    """A job killed before the script ends records no exit code: --wait says so and exits 1."""
    (tmp_path / "sleepy.py").write_text(
        "import time\nfrom jobqueue_ms.mpi import client\n"
        "client()\nprint('STARTED', flush=True)\ntime.sleep(600)\n"
    )
    args = ["--system", "slurm", "--nodes", "2", "--tasks-per-node", "2"]
    args += ["--job-name", job_name, "--wait"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobqueue_ms", "submit", *args, "sleepy.py"],
        cwd=tmp_path,
        env={**os.environ, **FAST_POLL},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def started() -> bool:
        assert proc.poll() is None, proc.communicate()
        logs = list(tmp_path.glob(f"{job_name}-*.out"))
        return bool(logs) and "STARTED" in logs[0].read_text()

    t0 = time.time()
    before = socket_dirs()
    try:
        wait_until(
            started,
            timeout=120,
            interval=0.2,
            message="the script to start",
        )
        run(["scancel", "--name", job_name])
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        remove_mpich_leftovers(since=t0)  # hydra, killed with the job, leaves them
        sweep_socket_dirs(before)  # and the worker ranks their socket directories
    assert proc.returncode == 1, err
    job_id = out.splitlines()[0]
    assert err.splitlines()[-1] == (
        f"jobqueue-ms submit: job {job_id} CANCELLED without recording the script's exit code "
        f"at {tmp_path / f'{job_name}-{job_id}.exit'}; exit code 1"
    )


# ============================================================================ the sbatch example

EXAMPLE = Path(__file__).resolve().parents[1] / "scripts" / "example-sbatch-mpi.sh"


def test_sbatch_example_is_valid_bash_and_the_one_in_the_docs():
    subprocess.run(["bash", "-n", str(EXAMPLE)], check=True)
    doc = (EXAMPLE.parents[1] / "docs" / "mpi.md").read_text()
    section = doc[doc.index("## A complete sbatch example") :]
    start = section.index("```bash\n") + len("```bash\n")
    assert section[start : section.index("```\n", start)] == EXAMPLE.read_text()


@pytest.mark.slow
def test_sbatch_example_runs_on_slurm(slurm, mpi, job_name, work, tmp_path):
    """sbatch the example as is; only its size is overridden to fit 2 emulated 2-CPU nodes."""
    size = ["--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem-per-cpu=500M"]
    export = f"--export=ALL,VENV={Path(mpi.python).parents[1]},JOBQUEUE_MS_MPI_INTERFACE=lo"
    argv = ["sbatch", "--parsable", f"--job-name={job_name}", export, *size]
    job_id = run([*argv, EXAMPLE, work, "0"], cwd=tmp_path).stdout.strip()

    def gone() -> bool:
        out = run(["squeue", "--noheader", "--jobs", job_id], check=False)
        return out.returncode == 0 and not out.stdout.strip()

    wait_until(gone, timeout=90, interval=0.2, message=f"example job {job_id} to end")
    output = (tmp_path / f"jqms-mpi-{job_id}.out").read_text()
    got = report_file(tmp_path)
    assert got["sum"] == sum(x * x for x in range(100)), output
    assert got["schedulers"] == 2
    assert got["slurm_nodes"] == "2"
