"""End to end with real workers: LocalCluster, then SLURMCluster and SGECluster on real daemons.

One parametrized fixture gives the same test a LocalCluster and a cluster on each real queue:
scale to two jobs, compute through the Client, see the workers, scale to zero and see the jobs
leave the queue. The rest are batch-only: a job cancelled behind the cluster's back, a job whose
prologue fails, a job spanning two SLURM nodes, and the schedulers in their own SLURM job.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
from helpers import wait_until

from jobqueue_ms import Client
from jobqueue_ms.config import Config
from jobqueue_ms.deploy.cluster import Cluster, ClusterError, JobState
from jobqueue_ms.deploy.local import LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HEARTBEAT = {"JOBQUEUE_MS_HEARTBEAT_TIMEOUT": "3"}


@pytest.fixture(autouse=True)
def submit_from_tmp_path(tmp_path, monkeypatch) -> None:
    """Jobs are submitted (and SGE jobs run) from the test's directory, not the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def fast_heartbeats(monkeypatch: pytest.MonkeyPatch) -> None:
    """Notice lost workers in seconds (the client and local schedulers read this)."""
    for key, value in HEARTBEAT.items():
        monkeypatch.setenv(key, value)


def batch_options(system: str, queue: Any, tmp_path) -> dict[str, Any]:
    """Options for one-core jobs on the test queue (``queue``: the slurm or sge fixture).

    The prologue carries the heartbeat setting: SGE jobs do not inherit our environment.
    """
    options: dict[str, Any] = {
        "cores": 1,
        "memory": "2GiB",
        "walltime": "00:10:00",
        "python": sys.executable,
        "log_directory": str(tmp_path),
        "poll_interval": 0.5,
        "job_script_prologue": [f"export {k}={v}" for k, v in HEARTBEAT.items()],
        "config": Config(),
    }
    if system == "slurm":
        options["queue"] = queue.partition
    else:
        options.update(queue=queue.queue, pe=queue.parallel_environment)
    return options


@pytest.fixture(params=["local", "slurm", "sge"])
def make_cluster(request, tmp_path) -> Iterator[Callable[..., Cluster]]:
    """A factory of clusters of one kind, each closed at teardown."""
    made: list[Cluster] = []

    def make(**kwargs: Any) -> Cluster:
        if request.param == "local":
            cluster: Cluster = LocalCluster(n_workers=0, **kwargs)
        else:
            from jobqueue_ms.batch.base import BatchCluster

            queue = request.getfixturevalue(request.param)
            options = {**batch_options(request.param, queue, tmp_path), **kwargs}
            cluster = BatchCluster.for_system(request.param)(**options)
        made.append(cluster)
        return cluster

    make.kind = request.param  # type: ignore[attr-defined]
    yield make
    for cluster in made:
        cluster.close()


def queued_ids(kind: str) -> set[str]:
    """Job ids the real queue still lists."""
    if kind == "slurm":
        out = subprocess.run(
            ["squeue", "--noheader", "--format=%i"], capture_output=True, text=True
        )
        return {line.split("_")[0] for line in out.stdout.split()}
    out = subprocess.run(["qstat", "-u", "*"], capture_output=True, text=True)
    return {line.split()[0] for line in out.stdout.splitlines()[2:] if line.strip()}


def test_scale_compute_and_leave_the_queue(make_cluster):
    cluster = make_cluster(n_schedulers=2)
    cluster.scale(jobs=2)
    cluster.wait_for_workers(2, timeout=120)
    with Client(cluster) as client:
        assert list(client.map(pow, range(30), [2] * 30)) == [x * x for x in range(30)]
    records = list(cluster.jobs.values())
    assert sorted(cluster.workers) == sorted(f"{r.name}-0" for r in records)
    wait_until(
        lambda: all(r.state == JobState.RUNNING for r in records), timeout=30, message=cluster
    )
    assert all(r.queued_s is not None for r in records)

    cluster.scale(0)  # graceful: the workers retire and the jobs end
    wait_until(lambda: all(r.state.finished for r in records), timeout=120, message=lambda: cluster)
    assert {r.state for r in records} <= {JobState.COMPLETED, JobState.CANCELLED}
    if make_cluster.kind == "local":
        assert not any(psutil.pid_exists(r.info["pid"]) for r in records)
    else:
        ids = {r.job_id for r in records}
        wait_until(lambda: not ids & queued_ids(make_cluster.kind), timeout=60)
    cluster.close()


@pytest.fixture(params=["slurm", "sge"])
def batch(request, tmp_path) -> Iterator[Callable[..., Cluster]]:
    """A factory of batch clusters on one real queue, each closed at teardown."""
    from jobqueue_ms.batch.base import BatchCluster

    made: list[Cluster] = []

    def make(**kwargs: Any) -> Cluster:
        queue = request.getfixturevalue(request.param)
        options = {**batch_options(request.param, queue, tmp_path), **kwargs}
        cluster = BatchCluster.for_system(request.param)(**options)
        made.append(cluster)
        return cluster

    make.kind = request.param  # type: ignore[attr-defined]
    yield make
    ids = set()
    for cluster in made:
        cluster.close()
        ids |= {r.job_id for r in cluster.jobs.values() if r.job_id}
    wait_until(lambda: not ids & queued_ids(request.param), timeout=60)


def test_a_job_cancelled_outside_is_cancelled_and_its_tasks_rerun(batch):
    cluster = batch()
    cluster.scale(jobs=2)
    cluster.wait_for_workers(2, timeout=120)
    with Client(cluster) as client:
        futures = [client.submit(time.sleep, 1.0) for _ in range(6)]
        wait_until(lambda: sum(w["running"] for w in cluster.workers.values()) >= 2, timeout=30)
        victim = sorted(cluster.jobs.values(), key=lambda r: r.name)[0]
        cancel = ["scancel"] if batch.kind == "slurm" else ["qdel"]
        subprocess.run([*cancel, victim.job_id], check=True, capture_output=True)
        for f in futures:
            assert f.result(timeout=120) is None  # every task completes: the lost ones rerun
    wait_until(lambda: victim.state.finished, timeout=60, message=lambda: cluster)
    assert victim.state == JobState.CANCELLED
    wait_until(lambda: len(cluster.workers) == 2, timeout=120, message=lambda: cluster)
    assert len(cluster.jobs) == 3  # the cancelled job was replaced


def test_a_job_that_fails_at_start_raises_with_its_log_tail(batch):
    cluster = batch(job_script_prologue=["echo 'prologue broke: no such module' >&2", "exit 3"])
    cluster.scale(jobs=1)
    with pytest.raises(ClusterError) as info:
        cluster.wait_for_workers(1, timeout=180)
    message = str(info.value)
    assert "failed before any worker connected" in message
    assert "prologue broke: no such module" in message
    assert all(r.state == JobState.FAILED for r in cluster.jobs.values())


def foreign_job(kind: str, directory) -> str:
    """Queue a held job that is not the cluster's (close() must leave it); return its id.

    Held, so it takes no slot from the cluster's jobs (SGE has one slot per core here).
    """
    if kind == "slurm":
        argv = ["sbatch", "--parsable", "--hold", "--mem=100M", "--job-name=foreign",
                f"--output={directory}/foreign-%j.out", "--wrap=sleep 300"]  # fmt: skip
        return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()
    argv = ["qsub", "-terse", "-h", "-b", "y", "-N", "foreign", "-o", str(directory), "-j", "y",
            "sleep", "300"]  # fmt: skip
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def test_close_cancels_every_job_it_submitted_and_only_those(batch, tmp_path):
    other = foreign_job(batch.kind, tmp_path)
    try:
        cluster = batch()
        cluster.scale(jobs=2)
        cluster.wait_for_workers(2, timeout=120)
        pids = [w["pid"] for w in cluster.workers.values()]
        assert all(psutil.pid_exists(pid) for pid in pids)
        ids = {r.job_id for r in cluster.jobs.values()}
        assert ids <= queued_ids(batch.kind)
        cluster.close()  # no scale(0) first: the jobs are running
        assert all(r.state == JobState.CANCELLED for r in cluster.jobs.values())
        wait_until(lambda: not ids & queued_ids(batch.kind), timeout=60)
        wait_until(lambda: not any(psutil.pid_exists(pid) for pid in pids), timeout=30)
        assert other in queued_ids(batch.kind)
    finally:
        cancel = ["scancel"] if batch.kind == "slurm" else ["qdel"]
        subprocess.run([*cancel, other], check=True, capture_output=True)
    wait_until(lambda: other not in queued_ids(batch.kind), timeout=60)


def test_a_job_array_starts_the_workers_of_every_task(batch, tmp_path):
    scratch = tmp_path / "node-local scratch"
    cluster = batch(job_array=2, local_directory=str(scratch))
    assert cluster.workers_per_job == 2
    cluster.scale(jobs=1)
    cluster.wait_for_workers(2, timeout=120)
    (record,) = cluster.jobs.values()
    assert sorted(cluster.workers) == [f"{record.name}-0", f"{record.name}-1"]
    with Client(cluster) as client:
        assert list(client.map(pow, range(20), [3] * 20)) == [x**3 for x in range(20)]
        # local_directory is the workers' TMPDIR, created by the job.
        assert client.submit(tempfile.gettempdir).result(timeout=60) == str(scratch)
    assert scratch.is_dir()
    cluster.scale(0)
    wait_until(lambda: record.state.finished, timeout=120, message=lambda: cluster)
    assert record.state in (JobState.COMPLETED, JobState.CANCELLED)
    wait_until(lambda: record.job_id not in queued_ids(batch.kind), timeout=60)


def test_a_two_node_slurm_job_starts_workers_on_both_nodes(slurm, tmp_path):
    from jobqueue_ms.batch.slurm import SLURMCluster

    options = batch_options("slurm", slurm, tmp_path)
    with SLURMCluster(nodes=2, **options) as cluster:
        cluster.scale(jobs=1)
        cluster.wait_for_workers(2, timeout=120)
        (record,) = cluster.jobs.values()
        assert sorted(cluster.workers) == [f"{record.name}-0", f"{record.name}-1"]
        nodes = {
            psutil.Process(w["pid"]).environ().get("SLURMD_NODENAME")
            for w in cluster.workers.values()
        }
        assert len(nodes) == 2 and None not in nodes, nodes
        with Client(cluster) as client:
            assert client.submit(pow, 12, 2).result(timeout=60) == 144


def test_schedulers_in_their_own_slurm_job(slurm, tmp_path):
    from jobqueue_ms.batch.slurm import SLURMCluster

    options = batch_options("slurm", slurm, tmp_path)
    cluster = SLURMCluster(
        scheduler_placement="job",
        n_schedulers=2,
        shared_directory=str(tmp_path / "shared"),
        scheduler_options={"memory": "1GiB"},
        **options,
    )
    try:
        out = subprocess.run(
            ["squeue", "--noheader", "--format=%i", f"--name={cluster.unique_name}-scheduler"],
            capture_output=True,
            text=True,
        ).stdout.split()
        (scheduler_job_id,) = out  # the schedulers run in this job
        assert len(cluster.scheduler_addresses) == 2
        cluster.scale(jobs=1)
        cluster.wait_for_workers(1, timeout=120)
        with Client(cluster) as client:
            assert list(client.map(pow, range(10), [2] * 10)) == [x * x for x in range(10)]
    finally:
        cluster.close()
    ids = {scheduler_job_id} | {r.job_id for r in cluster.jobs.values()}
    wait_until(lambda: not ids & queued_ids("slurm"), timeout=60)


def test_interface_applies_to_local_schedulers_and_workers(lsf_standin, tmp_path):
    """interface='lo': schedulers here and workers in the job (LSF stand-in) use 127.0.0.1."""
    from jobqueue_ms.batch.lsf import LSFCluster

    cluster = LSFCluster(
        cores=2,
        processes=2,
        memory="1GiB",
        walltime="00:10",
        interface="lo",
        python=sys.executable,
        log_directory=str(tmp_path),
        poll_interval=0.5,
        n_schedulers=2,
        config=Config(),
    )
    try:
        assert all(a.startswith("tcp://127.0.0.1:") for a in cluster.scheduler_addresses)
        assert "--interface lo\n" in cluster.job_script()
        cluster.scale(jobs=1)
        cluster.wait_for_workers(2, timeout=60)
        with Client(cluster) as client:
            assert client.submit(pow, 2, 10).result(timeout=30) == 1024
        # wait_for_workers counts the union; each scheduler may still be registering the other.
        wait_until(
            lambda: all(len(i["workers"]) == 2 for i in cluster.scheduler_info(max_age=0)),
            timeout=30,
        )
        for info in cluster.scheduler_info(max_age=0):
            assert info["address"].startswith("tcp://127.0.0.1:")
            assert len(info["workers"]) == 2
            for worker in info["workers"]:
                assert worker["data_address"].startswith("tcp://127.0.0.1:"), worker
    finally:
        cluster.close()


def sge_job_number(name: str) -> str | None:
    """The id of the SGE job called ``name`` (qstat -j takes job names), or None."""
    out = subprocess.run(["qstat", "-j", name], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("job_number:"):
            return line.split()[1]
    return None


def test_schedulers_in_their_own_sge_job(sge, tmp_path):
    """Two schedulers in one SGE job of one slot (the queue has a slot per core: 2 here)."""
    from jobqueue_ms.batch.sge import SGECluster

    options = batch_options("sge", sge, tmp_path)
    cluster = SGECluster(
        scheduler_placement="job",
        n_schedulers=2,
        shared_directory=str(tmp_path / "shared"),
        scheduler_options={"cores": 1},
        **options,
    )
    try:
        scheduler_job_id = sge_job_number(f"{cluster.unique_name}-scheduler")
        assert scheduler_job_id is not None  # the schedulers run in this job
        assert len(cluster.scheduler_addresses) == 2
        cluster.scale(jobs=1)
        cluster.wait_for_workers(1, timeout=120)
        with Client(cluster) as client:
            assert list(client.map(pow, range(10), [2] * 10)) == [x * x for x in range(10)]
        wait_until(  # wait_for_workers counts the union of what the schedulers see
            lambda: all(len(i["workers"]) == 1 for i in cluster.scheduler_info(max_age=0)),
            timeout=30,
        )
    finally:
        cluster.close()
    ids = {scheduler_job_id} | {r.job_id for r in cluster.jobs.values()}
    wait_until(lambda: not ids & queued_ids("sge"), timeout=60)
    assert not (tmp_path / "shared" / cluster.unique_name).exists()  # its scheduler files are gone
