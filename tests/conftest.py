"""Shared fixtures and hooks. Add new fixtures to the section they belong to (or a new section).

Sections:
  1. Polling: the ``wait_until`` fixture (the function itself lives in helpers.py).
  2. Real systems: markers ``slurm``/``sge``/``ssh``/``mpi`` skip with a reason when the system
     is missing; session fixtures ``slurm``, ``sge``, ``sshd``, ``mpi`` start it (when root) and
     describe it.
  3. Stand-ins: ``pbs_shim`` (slurm-wlm-torque qsub/qstat/qdel over the real SLURM) and
     ``lsf_standin`` (ci/lsf bsub/bjobs/bkill), both put first on PATH for one test.
  4. End of session: report leftover jobqueue_ms processes and queued jobs (report, never fail).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from helpers import CI, have, is_root, run, wait_until

# ============================================================================ 1. Polling


@pytest.fixture(name="wait_until")
def wait_until_fixture():
    """``wait_until(predicate, timeout, interval=0.02, message=None)``: poll with a deadline."""
    return wait_until


# ============================================================================ 2. Real systems


@dataclass(frozen=True)
class SlurmInfo:
    """The SLURM that ci/slurm/start runs: one partition of emulated nodes on this machine."""

    partition: str
    nodes: tuple[str, ...]
    cpus_per_node: int
    memory_mb_per_node: int
    conf: Path = Path("/etc/slurm/slurm.conf")
    # No slurmdbd, so no sacct: finished jobs show in squeue/scontrol only for MinJobAge (5 s).
    has_sacct: bool = False


@dataclass(frozen=True)
class SGEInfo:
    """The SGE that ci/sge/start runs: queue all.q on this host, parallel environment smp."""

    queue: str
    parallel_environment: str
    host: str
    slots: int


@dataclass(frozen=True)
class SSHInfo:
    """The sshd that ci/ssh/start runs: two loopback "hosts" on one port, key-only login."""

    hosts: tuple[str, ...]
    port: int
    user: str
    key: Path


@dataclass(frozen=True)
class MPIInfo:
    """The test venv's MPI: PyPI mpich (hydra mpiexec), no root or oversubscribe flags needed."""

    mpiexec: Path
    python: Path


_SYSTEM_STATUS: dict[str, str | None] = {}  # name -> None (ready) or the reason to skip
_SYSTEM_BROKEN: dict[str, str] = {}  # name -> why its start script failed


def _start(system: str) -> str | None:
    """Make ``system`` ready once per session: None when ready, else why the tests must skip.

    Installed but failing to start is a failure, not a skip: every test that needs it fails.
    """
    if system in _SYSTEM_BROKEN:
        pytest.fail(_SYSTEM_BROKEN[system], pytrace=False)
    if system in _SYSTEM_STATUS:
        return _SYSTEM_STATUS[system]
    daemon = {"slurm": "slurmctld", "sge": "sge_qmaster", "ssh": "sshd"}[system]
    reason = None
    if not have(daemon):
        reason = f"{system}: not installed (run ci/setup-system as root)"
    elif not is_root():
        healthy = {
            "slurm": ["sinfo", "--noheader", "--partition=debug", "--states=idle,mix,alloc"],
            "sge": ["qstat", "-q", "all.q"],
            "ssh": ["ssh", "-p", "2200", "-o", "BatchMode=yes", "127.0.0.1", "true"],
        }[system]
        proc = run(healthy, check=False, timeout=30)
        if proc.returncode != 0 or (system == "slurm" and not proc.stdout.strip()):
            reason = f"{system}: not running, and only root can run ci/{system}/start"
    else:
        proc = run([CI / system / "start"], check=False, timeout=180)
        if proc.returncode != 0:
            _SYSTEM_BROKEN[system] = (
                f"ci/{system}/start failed (exit {proc.returncode}):\n{proc.stderr}"
            )
            pytest.fail(_SYSTEM_BROKEN[system], pytrace=False)
    _SYSTEM_STATUS[system] = reason
    return reason


def _mpi_reason() -> str | None:
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi: mpi4py is not installed (pip install -e '.[test]')"
    if _mpiexec() is None:
        return "mpi: no mpiexec next to the interpreter or on PATH"
    return None


def _mpiexec() -> Path | None:
    beside = Path(sys.executable).parent / "mpiexec"
    found = beside if beside.exists() else shutil.which("mpiexec")
    return Path(found) if found else None


def pytest_configure(config):
    config.addinivalue_line("markers", "pbs: uses the PBS shim (slurm-wlm-torque over SLURM)")
    config.addinivalue_line("markers", "lsf: uses the LSF stand-in in ci/lsf")


# Fixture -> markers, so `-m slurm` (or `-m "not lsf"`) also selects tests that take the fixture.
_FIXTURE_MARKERS = {
    "slurm": ("slurm",),
    "sge": ("sge",),
    "sshd": ("ssh",),
    "mpi": ("mpi",),
    "pbs_shim": ("pbs", "slurm"),
    "lsf_standin": ("lsf",),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, markers in _FIXTURE_MARKERS.items():
            if fixture in getattr(item, "fixturenames", ()):
                for marker in markers:
                    if item.get_closest_marker(marker) is None:
                        item.add_marker(marker)


def _ssh_reason() -> str | None:
    if not Path("/usr/sbin/sshd").exists() or shutil.which("ssh") is None:
        return "ssh: sshd/ssh not installed (run ci/setup-system as root)"
    return None


def pytest_runtest_setup(item):
    for marker in ("slurm", "sge"):
        if item.get_closest_marker(marker) is not None:
            reason = _start(marker)
            if reason:
                pytest.skip(reason)
    # The ssh marker only checks that OpenSSH is there: tests start their own sshd (tests/sshd.py)
    # or take the `sshd` fixture, which runs ci/ssh/start.
    if item.get_closest_marker("ssh") is not None:
        reason = _ssh_reason()
        if reason:
            pytest.skip(reason)
    if item.get_closest_marker("mpi") is not None:
        reason = _mpi_reason()
        if reason:
            pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm() -> SlurmInfo:
    """A running SLURM (ci/slurm/start): partition ``debug`` of nodes n1 n2 n3, 2 CPUs each."""
    reason = _start("slurm")
    if reason:
        pytest.skip(reason)
    out = run(["sinfo", "--noheader", "--partition=debug", "--Node", "--format=%N %c %m"]).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    return SlurmInfo(
        partition="debug",
        nodes=tuple(r[0] for r in rows),
        cpus_per_node=int(rows[0][1]),
        memory_mb_per_node=int(rows[0][2]),
    )


@pytest.fixture(scope="session")
def sge() -> SGEInfo:
    """A running SGE (ci/sge/start): queue ``all.q`` with PE ``smp`` on this host."""
    reason = _start("sge")
    if reason:
        pytest.skip(reason)
    out = run(["qstat", "-f", "-q", "all.q"]).stdout
    row = next(line.split() for line in out.splitlines() if line.startswith("all.q@"))
    return SGEInfo(
        queue="all.q",
        parallel_environment="smp",
        host=row[0].split("@", 1)[1],
        slots=int(row[2].split("/")[-1]),
    )


@pytest.fixture(scope="session")
def sshd() -> SSHInfo:
    """A running sshd (ci/ssh/start) on 127.0.0.1:2200 and 127.0.0.2:2200; the default key works."""
    reason = _start("ssh")
    if reason:
        pytest.skip(reason)
    return SSHInfo(
        hosts=("127.0.0.1", "127.0.0.2"),
        port=2200,
        user=psutil.Process().username(),
        key=Path.home() / ".ssh" / "id_ed25519",
    )


@pytest.fixture(scope="session")
def mpi() -> MPIInfo:
    """The MPI of the test venv (PyPI mpich): its mpiexec and the interpreter that has mpi4py."""
    reason = _mpi_reason()
    if reason:
        pytest.skip(reason)
    mpiexec = _mpiexec()
    assert mpiexec is not None
    return MPIInfo(mpiexec=mpiexec, python=Path(sys.executable))


# ============================================================================ 3. Stand-ins


@dataclass(frozen=True)
class PBSShimInfo:
    bin: Path


@dataclass(frozen=True)
class LSFStandinInfo:
    bin: Path
    envdir: Path  # LSF_ENVDIR: holds lsf.conf
    state: Path  # JQMS_LSF_STATE: this test's queue


@pytest.fixture
def pbs_shim(slurm, monkeypatch) -> PBSShimInfo:
    """Put ci/pbs/bin (PBS-style qsub/qstat/qdel over the real SLURM) first on PATH for one test."""
    bin_dir = CI / "pbs" / "bin"
    if not Path("/opt/pbsshim/usr/bin/qsub").exists():
        pytest.skip("pbs: /opt/pbsshim missing (ci/setup-system unpacks slurm-wlm-torque there)")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return PBSShimInfo(bin=bin_dir)


@pytest.fixture
def lsf_standin(tmp_path, monkeypatch) -> Iterator[LSFStandinInfo]:
    """Put the LSF stand-in (ci/lsf/bin) first on PATH, with an empty queue, for one test.

    Settings come from ci/lsf/lsf.conf; override one before submitting, for example with
    ``monkeypatch.setenv("JQMS_LSF_SLOTS", "1")``. At teardown every unfinished job is killed
    (``bkill 0``) and awaited.
    """
    info = LSFStandinInfo(bin=CI / "lsf" / "bin", envdir=CI / "lsf", state=tmp_path / "lsf-state")
    monkeypatch.setenv("PATH", f"{info.bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("LSF_ENVDIR", str(info.envdir))
    monkeypatch.setenv("JQMS_LSF_STATE", str(info.state))
    yield info
    active = info.state / "active"
    if active.is_dir() and any(active.iterdir()):
        subprocess.run([info.bin / "bkill", "0"], capture_output=True, timeout=30, check=False)
        # bkill escalates SIGINT -> SIGTERM -> SIGKILL, JQMS_LSF_TERMINATE_INTERVAL (2 s) apart.
        wait_until(lambda: not any(active.iterdir()), timeout=30, message="LSF jobs to end")


# ============================================================================ 4. End of session


_AT_START: dict[str, set[str]] = {}  # what was already running when the session began


def _jobqueue_processes() -> set[str]:
    found = set()
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["pid"] == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any(part == "jobqueue_ms" or part.startswith("jobqueue_ms.") for part in cmdline):
            found.add(f"pid {proc.info['pid']}: {' '.join(cmdline)[:150]}")
    return found


def _queued_jobs() -> set[str]:
    found = set()
    if have("squeue"):
        out = run(["squeue", "--noheader", "--format=%i %j %T"], check=False).stdout
        found |= {f"SLURM job {line}" for line in out.splitlines() if line.strip()}
    if have("qstat") and Path("/var/lib/gridengine").is_dir():
        out = run(["qstat", "-u", "*"], check=False).stdout
        rows = [line.split() for line in out.splitlines()[2:] if line.strip()]
        found |= {f"SGE job {row[0]} {row[2]}" for row in rows}
    return found


def pytest_sessionstart(session):
    _AT_START["processes"] = _jobqueue_processes()
    _AT_START["jobs"] = _queued_jobs()


def pytest_terminal_summary(terminalreporter):
    """Report (never fail on) what appeared during the session and is still there at its end.

    Every test must stop what it starts. Other sessions on the same machine can show up here too.
    """
    leftovers = sorted(_jobqueue_processes() - _AT_START.get("processes", set()))
    leftovers += sorted(_queued_jobs() - _AT_START.get("jobs", set()))
    if leftovers:
        terminalreporter.section("still running at the end of the session", yellow=True)
        for line in leftovers:
            terminalreporter.write_line(line)
