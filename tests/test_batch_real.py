"""Rendered job scripts on real queues, with a stand-in interpreter instead of real workers.

SLURM and SGE are the real daemons (ci/slurm, ci/sge). PBS runs on the slurm-wlm-torque qsub/
qstat/qdel wrappers over the real SLURM (the ``pbs_shim`` fixture): it checks the plumbing and
the Torque syntax that sbatch reads, not PBS Pro's own parsing, and it shows no exit status, so
every ended job looks completed there. LSF runs on the stand-in in ci/lsf (``lsf_standin``),
which parses the directives strictly. The golden files cover the exact syntax of each.

The job scripts are the real templates; only ``python`` points at a small bash script that
records the worker arguments it was given (and the node it ran on), then sleeps and exits, so
these tests need no runtime on the compute side. End-to-end tests with real workers are in
test_batch_e2e.py.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from jobqueue_ms.batch.base import BatchCluster
from jobqueue_ms.config import Config
from jobqueue_ms.deploy.cluster import JobRecord, JobState

S = JobState
_counter = itertools.count(1)


@pytest.fixture(autouse=True)
def submit_from_tmp_path(tmp_path, monkeypatch):
    """Submit from the test's directory: the PBS shim writes <script>.o<id> where qsub runs."""
    monkeypatch.chdir(tmp_path)


def fake_python(tmp_path: Path, *, sleep: float = 1, exit_code: int = 0) -> tuple[str, Path]:
    """A stand-in interpreter: writes <calls>/<worker name>.args, sleeps, exits."""
    calls = tmp_path / "calls"
    calls.mkdir(exist_ok=True)
    path = tmp_path / "fake-python"
    path.write_text(
        "#!/bin/bash\n"
        "# Stands in for python in a rendered job script: records the worker's arguments.\n"
        "name=unnamed; prev=\n"
        'for arg in "$@"; do [ "$prev" = --name ] && name=$arg; prev=$arg; done\n'
        f"printf '%s\\n' \"$@\" > {calls}/$name.args\n"
        f'echo "node=${{SLURMD_NODENAME:-$(hostname)}}" >> {calls}/$name.args\n'
        'echo "fake worker $name starting" >&2\n'
        f"sleep {sleep}\n"
        f"exit {exit_code}\n"
    )
    path.chmod(0o755)
    return str(path), calls


def make(system: str, tmp_path: Path, python: str, **options) -> BatchCluster:
    """A cluster with real local schedulers whose sync loop stays idle (the test polls)."""
    options = {
        "cores": 2,
        "processes": 2,
        "memory": "200MiB",
        "walltime": "00:05:00",
        "python": python,
        "log_directory": str(tmp_path),
        "poll_interval": 3600,
        "config": Config(),
        **options,
    }
    return BatchCluster.for_system(system)(**options)


def submit(cluster: BatchCluster) -> JobRecord:
    """Submit one job through the cluster's _submit hook, recorded so close() cancels it."""
    record = JobRecord(name=f"{cluster.name}-r{next(_counter)}")
    cluster.jobs[record.name] = record
    cluster._submit(record)
    return record


def poll_until(cluster, record, states, wait_until, timeout=60.0) -> JobState:
    """Poll the queue (as the cluster's sync loop does) until the job is in one of ``states``."""
    seen: list[JobState] = []

    def reached():
        state = cluster._poll([record])[record.job_id]
        record.state = state
        seen.append(state)
        return state in states

    wait_until(reached, timeout=timeout, interval=0.3, message=lambda: f"{states}; saw {seen}")
    return record.state


@pytest.fixture(params=["slurm", "sge", "pbs", "lsf"])
def system(request) -> str:
    """Each batch system on its real daemon or stand-in (the fixture makes it ready)."""
    fixture = {"slurm": "slurm", "sge": "sge", "pbs": "pbs_shim", "lsf": "lsf_standin"}
    request.getfixturevalue(fixture[request.param])
    return request.param


def system_options(system: str, request) -> dict:
    if system == "slurm":
        return {"queue": request.getfixturevalue("slurm").partition}
    if system == "sge":
        sge = request.getfixturevalue("sge")
        return {"queue": sge.queue, "pe": sge.parallel_environment}
    if system == "pbs":
        return {"pbs_flavor": "torque", "queue": request.getfixturevalue("slurm").partition}
    return {"queue": "normal"}


def test_a_job_runs_one_worker_line_per_process_and_completes(
    system, request, tmp_path, wait_until
):
    python, calls = fake_python(tmp_path, sleep=1)
    cluster = make(system, tmp_path, python, **system_options(system, request))
    try:
        record = submit(cluster)
        ended = poll_until(cluster, record, {S.COMPLETED, S.FAILED, S.CANCELLED}, wait_until)
        assert ended == S.COMPLETED
        for i in range(2):
            args = (calls / f"{record.name}-{i}.args").read_text().splitlines()
            assert args[:3] == ["-m", "jobqueue_ms", "worker"]
            assert ["--job", record.name] == args[args.index("--job") : args.index("--job") + 2]
            assert args[args.index("--nthreads") + 1] == "1"
            assert args[args.index("--scheduler") + 1] == cluster.scheduler_addresses[0]
        if system != "pbs":  # the PBS shim writes its own <script>.o<id> files
            log = Path(record.log_path).read_text()
            assert f"fake worker {record.name}-0 starting" in log
    finally:
        cluster.close()


def test_a_cancelled_job_leaves_the_queue_as_cancelled(system, request, tmp_path, wait_until):
    python, calls = fake_python(tmp_path, sleep=300)
    cluster = make(system, tmp_path, python, **system_options(system, request))
    try:
        record = submit(cluster)
        poll_until(cluster, record, {S.RUNNING}, wait_until)
        wait_until(lambda: (calls / f"{record.name}-1.args").exists(), timeout=30)
        cluster._cancel([record])
        ended = poll_until(cluster, record, {S.CANCELLED, S.COMPLETED, S.FAILED}, wait_until)
        # The PBS shim reports every ended job as C (completed); the others say cancelled.
        assert ended == (S.COMPLETED if system == "pbs" else S.CANCELLED)
    finally:
        cluster.close()


def test_a_job_that_fails_is_failed_and_its_log_says_why(system, request, tmp_path, wait_until):
    if system == "pbs":
        pytest.skip("the PBS shim shows no exit status: a failed job looks completed")
    python, _ = fake_python(tmp_path, sleep=0, exit_code=3)
    cluster = make(system, tmp_path, python, **system_options(system, request))
    try:
        record = submit(cluster)
        ended = poll_until(cluster, record, {S.COMPLETED, S.FAILED, S.CANCELLED}, wait_until)
        assert ended == S.FAILED
        assert f"fake worker {record.name}-0 starting" in Path(record.log_path).read_text()
    finally:
        cluster.close()


@pytest.mark.parametrize(
    "system",
    ["sge", "lsf", pytest.param("slurm", marks=pytest.mark.slow)],
    indirect=True,
)
def test_the_walltime_end_is_timeout_not_failed(system, request, tmp_path, wait_until, monkeypatch):
    python, _ = fake_python(tmp_path, sleep=600)
    options = system_options(system, request)
    walltime, timeout = "00:00:05", 60.0
    if system == "lsf":
        monkeypatch.setenv("JQMS_LSF_SECONDS_PER_MINUTE", "3")  # -W 00:01 lasts 3 s
        monkeypatch.setenv("JQMS_LSF_RUNLIMIT_GRACE", "1")
    if system == "slurm":
        walltime, timeout = "00:01:00", 180.0  # Slurm counts whole minutes
    cluster = make(system, tmp_path, python, walltime=walltime, **options)
    try:
        record = submit(cluster)
        ended = poll_until(
            cluster, record, {S.TIMEOUT, S.FAILED, S.CANCELLED, S.COMPLETED}, wait_until, timeout
        )
        assert ended == S.TIMEOUT
    finally:
        cluster.close()


def test_slurm_multinode_job_starts_a_worker_group_on_every_node(slurm, tmp_path, wait_until):
    python, calls = fake_python(tmp_path, sleep=1)
    cluster = make("slurm", tmp_path, python, cores=1, processes=1, nodes=2, queue=slurm.partition)
    try:
        record = submit(cluster)
        assert poll_until(cluster, record, {S.COMPLETED, S.FAILED}, wait_until) == S.COMPLETED
        nodes = set()
        for i in range(2):
            args = (calls / f"{record.name}-{i}.args").read_text().splitlines()
            nodes.add(args[-1])
            assert args[args.index("--host") + 1]  # each worker names its own node's host
        assert len(nodes) == 2, nodes
    finally:
        cluster.close()


@pytest.mark.parametrize("system", ["slurm", "sge", "lsf"], indirect=True)
def test_a_job_array_numbers_the_workers_of_every_task(system, request, tmp_path, wait_until):
    python, calls = fake_python(tmp_path, sleep=1)
    options = system_options(system, request)
    cluster = make(system, tmp_path, python, cores=1, processes=1, job_array=3, **options)
    try:
        record = submit(cluster)
        assert cluster.workers_per_job == 3
        ended = poll_until(cluster, record, {S.COMPLETED, S.FAILED, S.CANCELLED}, wait_until)
        assert ended == S.COMPLETED
        names = sorted(p.stem for p in calls.glob("*.args"))
        assert names == [f"{record.name}-{i}" for i in range(3)]
        assert Path(record.log_path).exists()  # the first task's log
    finally:
        cluster.close()


def test_submitting_with_a_bad_directive_fails_with_the_queue_s_message(slurm, tmp_path):
    from jobqueue_ms.batch.base import CommandError

    cluster = make(
        "slurm",
        tmp_path,
        sys.executable,
        queue=slurm.partition,
        job_extra_directives=["--constraint=no-such-feature"],
    )
    try:
        with pytest.raises(
            CommandError, match="(?s)sbatch --parsable.*exited with code 1.*feature"
        ):
            submit(cluster)
    finally:
        cluster.close()


@pytest.mark.parametrize("system", ["slurm", "sge", "lsf"], indirect=True)
def test_a_template_file_over_a_shadowed_base_runs_on_the_queue(
    system, request, tmp_path, wait_until
):
    """template= (a full override) extends the system's template, whose base a site shadows."""
    python, calls = fake_python(tmp_path, sleep=0)
    site = tmp_path / "site-templates"
    site.mkdir()
    (site / "base.sh.j2").write_text(
        '{% extends "builtin/base.sh.j2" %}\n'
        "{% block launch_workers %}\n"
        'echo "site base.sh.j2 ran"\n'
        "{{ super() }}\n"
        "{% endblock %}\n"
    )
    mine = tmp_path / "mine.sh.j2"
    mine.write_text(
        f'{{% extends "{system}.sh.j2" %}}\n'
        "{% block launch_workers %}\n"
        'echo "user template file ran for {{ name }}"\n'
        "{{ super() }}\n"
        "{% endblock %}\n"
    )
    options = system_options(system, request)
    cluster = make(
        system, tmp_path, python, template=str(mine), template_dirs=[str(site)], **options
    )
    try:
        record = submit(cluster)
        ended = poll_until(cluster, record, {S.COMPLETED, S.FAILED, S.CANCELLED}, wait_until)
        assert ended == S.COMPLETED
        log = Path(record.log_path).read_text().splitlines()
        mark = log.index(f"user template file ran for {record.name}")
        assert log[mark + 1] == "site base.sh.j2 ran"
        assert sorted(p.stem for p in calls.glob("*.args")) == [
            f"{record.name}-0",
            f"{record.name}-1",
        ]
    finally:
        cluster.close()


def test_a_job_that_left_squeue_is_asked_about_with_scontrol(slurm, tmp_path, wait_until):
    """With a plain squeue (no --states=all, as some sites wrap it) ended jobs vanish at once.

    scontrol still knows them for MinJobAge (5 s here); after that, with no sacct (accounting
    is disabled here), a job is UNKNOWN, not COMPLETED, until its log or lost_after says more.
    """
    from jobqueue_ms.batch.slurm import SLURMCluster

    class PlainSqueueCluster(SLURMCluster):
        status_cmd = ("squeue", "--noheader", "--format=%i %T")

    def plain(python: str, **options) -> SLURMCluster:
        return PlainSqueueCluster(
            cores=1,
            memory="200MiB",
            walltime="00:05:00",
            python=python,
            log_directory=str(tmp_path),
            poll_interval=3600,
            queue=slurm.partition,
            config=Config(),
            **options,
        )

    (tmp_path / "ok").mkdir()
    (tmp_path / "bad").mkdir()
    ok_python, _ = fake_python(tmp_path / "ok", sleep=0)
    bad_python, _ = fake_python(tmp_path / "bad", sleep=0, exit_code=3)
    ok, bad = plain(ok_python, lost_after=8), plain(bad_python)
    try:
        done, failed = submit(ok), submit(bad)
        # Each is asked about as soon as it left squeue: scontrol says COMPLETED / FAILED.
        for cluster, record, state in ((ok, done, S.COMPLETED), (bad, failed, S.FAILED)):
            wait_until(
                lambda r=record: (
                    not subprocess.run(
                        ["squeue", "--noheader", "--format=%i", f"--jobs={r.job_id}"],
                        capture_output=True,
                        text=True,
                    ).stdout.strip()
                ),
                timeout=60,
                message=f"job {record.job_id} to leave squeue",
            )
            assert cluster._poll([record]) == {record.job_id: state}

        def forgotten(job_id: str) -> bool:
            out = subprocess.run(
                ["scontrol", "show", "job", job_id], capture_output=True, text=True
            )
            return out.returncode != 0

        wait_until(lambda: forgotten(done.job_id), timeout=60, interval=0.5)
        assert ok._poll([done]) == {done.job_id: S.UNKNOWN}  # not assumed COMPLETED
        poll_until(ok, done, {S.FAILED}, wait_until, timeout=60)
        assert "left the queue and no command knows how it ended" in done.info["lost"]
    finally:
        ok.close()
        bad.close()
