"""SSHCluster against real sshd instances: 127.0.0.2 and 127.0.0.3 act as two hosts.

The sshd instances come from tests/sshd.py (own config, key and authorized_keys in a temporary
directory). Both "hosts" are this machine, so the tests can look at remote processes and the
remote directory with psutil and os.path directly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import wait_until
from sshd import SSHHosts, start_hosts, stop_hosts, why_not_available

from jobqueue_ms import Client
from jobqueue_ms.deploy.cluster import ClusterError, JobState
from jobqueue_ms.deploy.ssh import SSHCluster, SSHError

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(240)]

HEARTBEAT = {"JOBQUEUE_MS_HEARTBEAT_TIMEOUT": "3"}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHHosts]:
    """Two sshd "hosts", 127.0.0.2 and 127.0.0.3, with key-only login; stopped after."""
    reason = why_not_available()
    if reason:
        pytest.skip(reason)
    running = start_hosts(tmp_path_factory.mktemp("sshd"))
    yield running
    stop_hosts(running)


@pytest.fixture(autouse=True)
def fast_heartbeats(monkeypatch: pytest.MonkeyPatch) -> None:
    """Notice dead workers in seconds (the client reads this too; the remote side via prologue)."""
    for key, value in HEARTBEAT.items():
        monkeypatch.setenv(key, value)


def make_cluster(sshd_hosts: SSHHosts, **kwargs: Any) -> SSHCluster:
    options: dict[str, Any] = {
        "hosts": list(sshd_hosts.addresses),
        "python": sys.executable,
        "ssh_options": sshd_hosts.ssh_options,
        "port": sshd_hosts.port,
        "prologue": [f"export {k}={v}" for k, v in HEARTBEAT.items()],
        "poll_interval": 0.3,
    }
    options.update(kwargs)
    return SSHCluster(**options)


def processes_of(name: str) -> list[psutil.Process]:
    """Processes on this machine (so on every test "host") whose command line names ``name``."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if name in cmdline and p.info["status"] != psutil.STATUS_ZOMBIE and p.pid != os.getpid():
            found.append(p)
    return found


def live_jobs(cluster: SSHCluster) -> list[str]:
    return [r.name for r in cluster.jobs.values() if not r.state.finished]


def test_two_hosts_two_schedulers_compute_scale_and_close(hosts: SSHHosts) -> None:
    cluster = make_cluster(
        hosts, n_schedulers=2, scheduler_hosts=list(hosts.addresses), workers_per_host=2
    )
    try:
        assert sorted(a.split("//")[1].rsplit(":", 1)[0] for a in cluster.scheduler_addresses) == [
            "127.0.0.2",
            "127.0.0.3",
        ]
        script = cluster.job_script()
        subprocess.run(["bash", "-n"], input=script, text=True, check=True)

        cluster.scale(jobs=2)
        cluster.wait_for_workers(4, timeout=60)
        by_host = sorted(w["host"] for w in cluster.workers.values())
        assert by_host == ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"]
        with Client(cluster) as client:
            futures = [client.submit(pow, i, 2) for i in range(40)]
            assert [f.result(timeout=60) for f in futures] == [i * i for i in range(40)]
            assert client.submit(socket.gethostname).result(timeout=60)

        cluster.scale(jobs=3)  # the third job goes to a host with the fewest jobs
        cluster.wait_for_workers(6, timeout=60)
        per_host = Counter(r.info["host"] for r in cluster.jobs.values())
        assert sorted(per_host.values()) == [1, 2]
        cluster.scale(jobs=2)
        wait_until(lambda: len(live_jobs(cluster)) == 2, timeout=60, message=lambda: cluster)
        first = sorted(cluster.workers)[0]
        cluster.scale_down([first])  # the policy's verb, by worker name: that worker only
        wait_until(lambda: len(cluster.workers) == 3, timeout=60, message=lambda: cluster)
        assert len(live_jobs(cluster)) == 2
        (job,) = [r for r in cluster.jobs.values() if first in r.worker_names]
        cluster.scale_down([w for w in job.worker_names if w != first])  # its last: the job ends
        wait_until(lambda: len(live_jobs(cluster)) == 1, timeout=60, message=lambda: cluster)
        wait_until(lambda: len(cluster.workers) == 2, timeout=60, message=lambda: cluster)
        assert all(
            r.state in (JobState.COMPLETED, JobState.CANCELLED)
            for r in cluster.jobs.values()
            if r.state.finished
        )
        remote_directory = cluster.remote_directory
        assert os.path.isdir(remote_directory)
    finally:
        cluster.close()
    assert cluster.close_errors == []
    assert not os.path.exists(remote_directory)
    assert processes_of(cluster.name) == []


def test_killed_worker_is_replaced_while_scaled(hosts: SSHHosts) -> None:
    with make_cluster(hosts) as cluster:
        cluster.scale(jobs=2)
        cluster.wait_for_workers(2, timeout=60)
        victim = sorted(cluster.workers)[0]
        nanny = min(
            (p for p in processes_of(f"--name {victim}") if "jobqueue_ms" in " ".join(p.cmdline())),
            key=lambda p: p.create_time(),
        )
        os.killpg(os.getpgid(nanny.pid), signal.SIGKILL)

        def replaced() -> bool:
            names = set(cluster.workers)
            return len(names) == 2 and victim not in names and len(live_jobs(cluster)) == 2

        wait_until(replaced, timeout=60, interval=0.2, message=lambda: repr(cluster))
        assert any(r.state == JobState.FAILED for r in cluster.jobs.values())
    assert processes_of(cluster.name) == []


def test_a_worker_killed_under_adapt_is_replaced(hosts: SSHHosts) -> None:
    with make_cluster(hosts) as cluster:
        adaptive = cluster.adapt(minimum_jobs=2, maximum_jobs=2, interval=0.3)
        wait_until(lambda: len(cluster.workers) == 2, timeout=60, message=lambda: cluster)
        victim = sorted(cluster.workers)[0]
        (victim_job,) = (r for r in cluster.jobs.values() if victim in r.worker_names)
        host = victim_job.info["host"]
        os.killpg(victim_job.info["pgid"], signal.SIGKILL)  # the whole remote launch dies

        def replaced() -> bool:
            names = set(cluster.workers)
            return len(names) == 2 and victim not in names and len(live_jobs(cluster)) == 2

        wait_until(replaced, timeout=60, interval=0.2, message=lambda: repr(cluster))
        assert victim_job.state == JobState.FAILED
        assert not psutil.pid_exists(victim_job.info["pgid"])
        # The replacement went to the host that lost its job (the one with the fewest jobs).
        newest = max(cluster.jobs.values(), key=lambda r: r.submitted_at)
        assert newest.info["host"] == host
        with Client(cluster) as client:
            assert client.submit(pow, 7, 2).result(timeout=60) == 49
        adaptive.stop()
    assert processes_of(cluster.name) == []


def test_every_ssh_call_to_a_host_shares_one_connection(hosts: SSHHosts) -> None:
    before = {a: hosts.logins(a) for a in hosts.addresses}
    with make_cluster(hosts, n_schedulers=2, scheduler_hosts=list(hosts.addresses)) as cluster:
        cluster.scale(jobs=2)  # check, scheduler start, file reads, submit: many ssh calls
        cluster.wait_for_workers(2, timeout=60)
        for _ in range(5):
            cluster.sync()  # each polls every host over ssh
        cluster.scale(jobs=0)
        wait_until(lambda: not live_jobs(cluster), timeout=60, message=lambda: cluster)
        masters = processes_of(f"{cluster.cluster_dir}/cm-")
        assert len(masters) == 2, [p.cmdline() for p in masters]
        logins = {a: hosts.logins(a) - before[a] for a in hosts.addresses}
    assert logins == {a: 1 for a in hosts.addresses}
    assert processes_of(f"{cluster.cluster_dir}/cm-") == []  # close() stopped the masters


def test_adapt_scales_up_for_work_and_down_when_idle(hosts: SSHHosts) -> None:
    import time

    with make_cluster(hosts) as cluster:
        adaptive = cluster.adapt(minimum_jobs=0, maximum_jobs=2, interval=0.3, wait_count=2)
        with Client(cluster) as client:
            futures = [client.submit(time.sleep, 0.5) for _ in range(12)]
            wait_until(lambda: len(cluster.workers) >= 1, timeout=60, message=lambda: cluster)
            for f in futures:
                f.result(timeout=120)
        assert {r.info["host"] for r in cluster.jobs.values()} <= set(hosts.addresses)
        wait_until(
            lambda: not live_jobs(cluster), timeout=90, interval=0.2, message=lambda: cluster
        )
        adaptive.stop()
    assert processes_of(cluster.name) == []


def test_values_reach_the_remote_side_quoted_once(hosts: SSHHosts) -> None:
    """ssh joins its words and the remote shell parses them again: quoting must survive that."""
    tricky = """it's "quoted" $HOME `id` ; & | * \\ end"""
    with make_cluster(
        hosts,
        hosts=[hosts.addresses[0]],
        env={"JQMS_TRICKY": tricky},
        prologue=[*(f"export {k}={v}" for k, v in HEARTBEAT.items()), "export FROM_PROLOGUE='a b'"],
    ) as cluster:
        cluster.scale(jobs=1)
        cluster.wait_for_workers(1, timeout=60)
        # A lambda travels by value; os.environ.get would carry the client's os.environ along.
        remote_env = lambda name: __import__("os").environ.get(name)  # noqa: E731
        with Client(cluster) as client:
            assert client.submit(remote_env, "JQMS_TRICKY").result(timeout=60) == tricky
            assert client.submit(remote_env, "FROM_PROLOGUE").result(timeout=60) == "a b"


def test_unreachable_host_names_it_and_shows_ssh_error(hosts: SSHHosts) -> None:
    with pytest.raises(SSHError) as info:
        make_cluster(hosts, hosts=["127.0.0.9"], connect_timeout=5)
    message = str(info.value)
    assert "127.0.0.9" in message
    assert "unreachable" in message
    assert "Connection refused" in message


def test_authentication_failure_is_named(hosts: SSHHosts, tmp_path: Path) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    options = [str(other) if o == str(hosts.key) else o for o in hosts.ssh_options]
    with pytest.raises(SSHError) as info:
        make_cluster(hosts, hosts=[hosts.addresses[0]], ssh_options=options)
    assert "127.0.0.2" in str(info.value)
    assert "authentication failed" in str(info.value)
    assert "Permission denied" in str(info.value)


def test_bad_python_path_is_named(hosts: SSHHosts) -> None:
    with pytest.raises(SSHError) as info:
        make_cluster(hosts, python="/no/such/python", name="jqms-badpython")
    message = str(info.value)
    assert "127.0.0.2" in message
    assert "'/no/such/python' cannot import jobqueue_ms" in message
    assert "No such file or directory" in message
    assert not os.path.exists("/tmp/jqms-badpython")  # what the failed start created is gone


def test_scheduler_port_in_use_is_named(hosts: SSHHosts) -> None:
    with socket.socket() as taken:
        taken.bind((hosts.addresses[0], 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ClusterError) as info:
            make_cluster(hosts, scheduler_port=port)
    message = str(info.value)
    assert f"host '127.0.0.2': the scheduler exited before listening on 127.0.0.2:{port}" in message
    assert "in use" in message


def test_host_unreachable_at_close_is_reported(tmp_path: Path) -> None:
    reason = why_not_available()
    if reason:
        pytest.skip(reason)
    lone = start_hosts(tmp_path / "sshd", ("127.0.0.4",))
    cluster = None
    try:
        cluster = make_cluster(lone, name=f"jqms-lost-{os.getpid()}")
        cluster.scale(jobs=1)
        cluster.wait_for_workers(1, timeout=60)
        stop_hosts(lone)  # no new connections; then drop the shared one too
        for master in processes_of(f"{cluster.cluster_dir}/cm-"):
            with contextlib.suppress(psutil.NoSuchProcess):
                master.kill()
        with pytest.raises(ClusterError, match="could not clean up every host"):
            cluster.close(timeout=5)
        assert len(cluster.close_errors) == 1
        assert "127.0.0.4" in cluster.close_errors[0]
    finally:
        stop_hosts(lone)
        if cluster is not None:  # what the test left on the "lost" host
            for p in processes_of(cluster.name):
                with contextlib.suppress(psutil.NoSuchProcess):  # it may have just exited
                    p.kill()
            wait_until(lambda: not processes_of(cluster.name), timeout=10)
            subprocess.run(["rm", "-rf", cluster.remote_directory], check=True)


EXIT_WITHOUT_CLOSE = """
import sys
from jobqueue_ms.deploy.ssh import SSHCluster

options = {options!r}
cluster = SSHCluster(**options)
cluster.scale(jobs=2)
cluster.wait_for_workers(2, timeout=60)
print(cluster.name, cluster.remote_directory, flush=True)
# no close(): interpreter exit must clean up
"""


def test_interpreter_exit_stops_remote_processes(hosts: SSHHosts) -> None:
    options = {
        "hosts": list(hosts.addresses),
        "python": sys.executable,
        "ssh_options": hosts.ssh_options,
        "port": hosts.port,
        "prologue": [f"export {k}={v}" for k, v in HEARTBEAT.items()],
    }
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_WITHOUT_CLOSE.format(options=options)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert len(proc.stdout.split()) == 2, proc.stderr
    name, remote_directory = proc.stdout.split()
    try:
        assert proc.returncode == 0, proc.stderr
        assert processes_of(name) == []
        assert not os.path.exists(remote_directory)
    finally:  # what a failure left behind
        for p in processes_of(name):
            p.kill()
        subprocess.run(["rm", "-rf", remote_directory], check=True)
