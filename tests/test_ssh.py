"""SSHCluster against real sshd instances: 127.0.0.2 and 127.0.0.3 act as two hosts.

The sshd instances come from tests/sshd.py (own config, key and authorized_keys in a temporary
directory). Both "hosts" are this machine, so the tests can look at remote processes and the
remote directory with psutil and os.path directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
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
from ssh_golden import GOLDEN, GOLDEN_CASES, UPDATE, render_case
from sshd import SSHHosts, start_hosts, stop_hosts, why_not_available

from jobqueue_ms import Client
from jobqueue_ms.deploy.cluster import ClusterError, JobState
from jobqueue_ms.deploy.ssh import (
    REMOTE_COMMAND,
    UNIX_PATH_MAX,
    HostCapacity,
    SSHCluster,
    SSHError,
    _control_directory,
    connect_timeout_option,
    lifeline_script,
    lifeline_stdin,
    parse_hosts,
    place_job,
    remote_stdin,
    scheduler_placement,
)
from jobqueue_ms.runtime.security import Security

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


def control_masters(cluster: SSHCluster) -> list[psutil.Process]:
    """The cluster's ControlMaster processes (they rename themselves "ssh: <socket> [mux]")."""
    return [
        p
        for p in processes_of(f"{cluster.control_directory}/cm-")
        if p.cmdline()[0].startswith("ssh: ")
    ]


def live_jobs(cluster: SSHCluster) -> list[str]:
    return [r.name for r in cluster.jobs.values() if not r.state.finished]


def test_each_host_gets_a_private_copy_of_the_key_file_never_on_a_command_line(
    hosts: SSHHosts,
) -> None:
    cluster = make_cluster(hosts, workers_per_host=1)
    try:
        cluster.scale(jobs=2)
        cluster.wait_for_workers(2, timeout=60)
        copy = Path(cluster.remote_keyfile)  # both "hosts" are this machine: one path
        assert copy.stat().st_mode & 0o777 == 0o600
        assert copy.parent.stat().st_mode & 0o777 == 0o700
        assert Security.load(str(copy)) == dataclasses.replace(cluster.security, path=str(copy))
        secrets = [cluster.security.server_secret.decode(), cluster.security.client_secret.decode()]
        ours = [
            p
            for p in psutil.process_iter(["cmdline"])
            if cluster.name in " ".join(p.info["cmdline"] or [])
        ]
        assert ours
        for p in ours:
            line = " ".join(p.info["cmdline"] or [])
            assert not any(s in line for s in secrets)
        assert f"--keyfile {copy}" in cluster.job_script()
        assert not any(s in cluster.job_script(role="scheduler") for s in secrets)
        with Client(cluster) as client:
            assert client.submit(pow, 2, 8).result(timeout=60) == 256
    finally:
        cluster.close()
    assert not copy.exists() and not Path(str(cluster.security.path)).exists()


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

        cluster.scale(jobs=3)  # the third job goes to a host with the most free cores
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
        masters = control_masters(cluster)
        assert len(masters) == 2, [p.cmdline() for p in masters]
        logins = {a: hosts.logins(a) - before[a] for a in hosts.addresses}
    assert logins == {a: 1 for a in hosts.addresses}
    assert control_masters(cluster) == []  # close() stopped the masters
    assert not os.path.exists(cluster.control_directory)


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
    assert isinstance(info.value, SSHError)  # with ssh's command and the scheduler's script
    assert f"host '127.0.0.2': scheduler 0 exited before listening on 127.0.0.2:{port}" in message
    assert "in use" in message  # the scheduler's log, shown as stderr
    assert "\n  command: ssh " in message
    assert f"-m jobqueue_ms scheduler --host 127.0.0.2 --port {port}" in message


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
        for master in processes_of(f"{cluster.control_directory}/cm-"):
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


OWNER_KILLED = """
import sys
from jobqueue_ms.deploy.ssh import SSHCluster

SSHCluster.lifeline_grace_s = {grace}
cluster = SSHCluster(**{options!r})
cluster.scale(jobs=2)
cluster.wait_for_workers(2, timeout=60)
print(cluster.name, cluster.remote_directory, cluster.control_directory, flush=True)
sys.stdin.read()  # until the test kills this process
"""


def test_a_killed_owner_s_remote_processes_stop_after_the_lifeline_grace(hosts: SSHHosts) -> None:
    """SIGKILL the process that made the cluster: no close(), no atexit. The hosts notice the
    lifelines end and, after the grace a reconnecting owner would have, stop what it started
    there and remove the remote directory; the next cluster removes the control directory."""
    grace = 4.0
    options = {
        "hosts": list(hosts.addresses),
        "scheduler_hosts": list(hosts.addresses),
        "n_schedulers": 2,
        "python": sys.executable,
        "ssh_options": hosts.ssh_options,
        "port": hosts.port,
        "prologue": [f"export {k}={v}" for k, v in HEARTBEAT.items()],
    }
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER_KILLED.format(grace=grace, options=options)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    name = remote_directory = control_directory = ""
    try:
        assert owner.stdout is not None and owner.stderr is not None
        line = owner.stdout.readline()  # printed once the workers are connected
        assert len(line.split()) == 3, owner.stderr.read()
        name, remote_directory, control_directory = line.split()
        started = processes_of(name)
        assert sum("scheduler" in p.cmdline() for p in started) == 2
        assert sum("worker" in p.cmdline() for p in started) >= 2
        owner.kill()
        owner.wait(timeout=10)
        # not at once: a reconnecting owner would have the grace to take over
        assert started[0].is_running() and os.path.exists(remote_directory)
        wait_until(
            lambda: not processes_of(name) and not os.path.exists(remote_directory),
            timeout=grace + 40,
            message=lambda: [p.cmdline() for p in processes_of(name)],
        )
        # the next cluster of this user removes the dead owner's control directory
        with make_cluster(hosts) as cluster:
            assert cluster.control_directory != control_directory
        assert not os.path.exists(control_directory)
    finally:  # what a failure left behind
        if owner.poll() is None:
            owner.kill()
        owner.communicate(timeout=10)  # reaps it, closes the pipes
        for p in processes_of(name) if name else []:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        for p in processes_of(control_directory) if control_directory else []:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()  # its ControlMasters would otherwise linger for ControlPersist
        for d in (remote_directory, control_directory):
            if d:
                shutil.rmtree(d, ignore_errors=True)


# ============================================================================ pure parts

CAP = {"a": HostCapacity(4, 8 * 2**30, 0.5), "b": HostCapacity(2, 8 * 2**30, 0.1)}


@pytest.mark.parametrize(
    ("jobs", "kwargs", "expected"),
    [
        # the most cores left after the job wins, whatever the order or count of jobs
        ({}, {}, "a"),
        ({"a": 1}, {}, "a"),  # 4 - 2 = 2 left against 2 - 1 = 1
        ({"a": 2}, {}, "b"),  # 1 left on each: fewer of our jobs wins
        ({"a": 3}, {}, "b"),
        # a tie on cores left: fewer of our jobs, then the lower load
        ({"a": 2, "b": 0}, {"cores_per_job": 1}, "b"),
        ({"a": 1, "b": 1}, {"cores_per_job": 1, "hosts": ["a", "b", "c"]}, "a"),
        # jobs of several cores
        ({"a": 1}, {"cores_per_job": 2}, "b"),
        ({"a": 0, "b": 0}, {"cores_per_job": 2}, "a"),
        # memory: a job whose workers' limits no longer fit goes elsewhere
        ({"a": 1}, {"memory_per_job": 6 * 2**30}, "b"),
        ({"a": 1, "b": 1}, {"memory_per_job": 6 * 2**30}, "a"),  # nowhere fits: cores decide
        # max_jobs_per_host
        ({"a": 2, "b": 2}, {"max_jobs_per_host": 2}, None),
        ({"a": 0, "b": 1}, {"max_jobs_per_host": 1}, "a"),
    ],
)
def test_place_job_table(jobs, kwargs, expected):
    hosts = kwargs.pop("hosts", ["b", "a"])
    assert place_job(hosts, CAP, jobs, **kwargs) == expected


def test_place_job_without_a_probe_counts_one_core():
    assert place_job(["x", "y"], {}, {"x": 1}) == "y"
    assert place_job(["x", "y"], {"y": HostCapacity(1)}, {}) == "x"  # tie: listed order


def test_parse_hosts_forms_and_errors():
    got = parse_hosts("hosts", ["n1", {"host": "vm1", "address": "10.0.0.5"}, "n1"])
    assert got == {"n1": None, "vm1": "10.0.0.5"}
    for bad, match in [
        ("n1", "must be a non-empty list"),
        ([], "must be a non-empty list"),
        ([{"host": "vm1", "adress": "x"}], r"unknown keys: \['adress'\]"),
        ([{"address": "10.0.0.5"}], "use {'host': 'vm1'}"),
        ([{"host": "a", "address": "1"}, {"host": "a", "address": "2"}], "different addresses"),
        ([3], "not a host name"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_hosts("hosts", bad)


def test_fixed_scheduler_port_with_two_schedulers_on_one_host_is_refused():
    assert scheduler_placement(3, ["h1", "h2"]) == ["h1", "h2", "h1"]
    with pytest.raises(ValueError) as info:
        SSHCluster(["h1"], n_schedulers=2, scheduler_port=8786)
    message = str(info.value)
    assert "scheduler_port=8786 with n_schedulers=2" in message
    assert "['h1']" in message and "scheduler_port=0" in message


@pytest.mark.parametrize(("seconds", "option"), [(0.5, 1), (0.001, 1), (1, 1), (2.1, 3), (10, 10)])
def test_connect_timeout_is_whole_seconds_at_least_one(seconds, option):
    assert connect_timeout_option(seconds) == f"ConnectTimeout={option}"


def test_control_sockets_go_to_a_short_directory(tmp_path, monkeypatch):
    long_tmp = tmp_path / ("x" * 90)
    long_tmp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(long_tmp))
    directory = _control_directory()
    try:
        assert directory.startswith("/tmp/jqms-cm-")
        # what ssh creates: <dir>/cm-<40 hex digits>.<16 random characters>
        assert len(f"{directory}/cm-{'0' * 40}.{'X' * 16}") < UNIX_PATH_MAX
    finally:
        os.rmdir(directory)


def _lifeline(directory: Path, token: str, grace: float) -> subprocess.Popen[str]:
    """The remote end of a lifeline, run here as sshd would run it (``bash -s``, our stdin)."""
    proc = subprocess.Popen(
        ["bash", "-s"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    assert proc.stdin is not None
    proc.stdin.write(lifeline_stdin(lifeline_script(str(directory), token, grace)))
    proc.stdin.flush()
    mark = directory / "lifeline"
    wait_until(lambda: mark.exists() and mark.read_text().strip() == token, timeout=10)
    return proc


@pytest.mark.parametrize("ending", ["bye", "eof", "eof, then a newer lifeline"])
def test_the_lifeline_s_remote_end(ending: str, tmp_path: Path) -> None:
    """bye: nothing stopped. End of input: after the grace, the launched groups that have not
    exited are stopped and the directory removed; unless a newer lifeline replaced the token."""
    d = tmp_path / "remote"
    d.mkdir()
    job = subprocess.Popen(["sleep", "300"], start_new_session=True)  # a launched job's group
    (d / "job-1.pgid").write_text(f"{job.pid}\n")
    (d / "job-0.pgid").write_text("999999999\n")  # exited long ago: its .exit is there
    (d / "job-0.exit").write_text("0\n")
    try:
        grace = 2.0  # room for the newer lifeline's bash to start within it on a loaded machine
        line = _lifeline(d, "first", grace)
        assert line.stdin is not None
        if ending == "bye":
            line.stdin.write("bye\n")
        line.stdin.close()
        assert line.wait(timeout=10) == 0  # at once: the cleanup is detached
        if ending == "eof":
            wait_until(lambda: job.poll() is not None and not d.exists(), timeout=grace + 15)
            assert job.returncode == -signal.SIGTERM
            return
        if ending != "bye":
            newer = _lifeline(d, "second", grace)  # within the grace
        # the first lifeline's cleanup (if any) waits out its grace, then finds itself replaced
        wait_until(lambda: not processes_of(f"jqms-lifeline {d}"), timeout=grace + 15)
        assert job.poll() is None and d.exists()
        if ending != "bye":
            assert newer.stdin is not None
            newer.stdin.write("bye\n")
            newer.stdin.close()
            assert newer.wait(timeout=10) == 0
    finally:
        job.kill()
        job.wait()


@pytest.mark.parametrize("shell", ["bash", "dash", "tcsh", "csh"])
def test_the_remote_command_survives_any_login_shell(shell, tmp_path):
    """sshd runs the command with the user's login shell (`$SHELL -c COMMAND`): do that here.

    The script travels on stdin, so the login shell parses only `bash -s`; csh/tcsh could not
    parse the multi-line `bash -c '...'` that was sent before (shown by the old form failing).
    """
    path = shutil.which(shell)
    if path is None:
        pytest.skip(f"{shell} is not installed")
    out = tmp_path / "out"
    script = f"set -e\nx='it'\"'\"'s \"quoted\" $HOME'\nprintf '%s\\n' \"$x\" > {out}\necho done"
    proc = subprocess.run(
        [path, "-c", REMOTE_COMMAND], input=remote_stdin(script), capture_output=True, text=True
    )
    assert (proc.returncode, proc.stdout) == (0, "done\n"), proc.stderr
    assert out.read_text() == 'it\'s "quoted" $HOME\n'  # single quotes kept it literal
    if shell in ("tcsh", "csh"):
        old = subprocess.run(
            [path, "-c", shlex.join(["bash", "-c", script])], capture_output=True, text=True
        )
        assert old.returncode != 0


# ============================================================================ goldens


@pytest.mark.parametrize(("role", "case"), sorted(GOLDEN_CASES), ids="/".join)
def test_ssh_template_golden(role, case):
    rendered = render_case(role, case)
    path = GOLDEN / role / f"{case}.sh"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rendered)
    assert path.read_text() == rendered, f"{path} differs; run scripts/update-goldens to review"
    subprocess.run(["bash", "-n"], input=rendered, text=True, check=True)


def test_every_ssh_golden_has_a_case():
    assert {(p.parent.name, p.stem) for p in GOLDEN.glob("*/*.sh")} == set(GOLDEN_CASES)


# ============================================================================ more real sshd


def remote_scheduler(cluster: SSHCluster, index: int) -> psutil.Process:
    """The scheduler process itself (not its launch script), found by its scheduler file."""
    file = f"{cluster.remote_directory}/scheduler-{index}.json"
    (proc,) = [p for p in processes_of(file) if p.cmdline()[:1] == [cluster.python]]
    return proc


def test_job_script_shows_the_scheduler_launch_that_runs(hosts: SSHHosts) -> None:
    with make_cluster(hosts, hosts=[hosts.addresses[0]]) as cluster:
        script = cluster.job_script(role="scheduler")
        assert Path(f"{cluster.remote_directory}/scheduler-0.sh").read_text() == script
        subprocess.run(["bash", "-n"], input=script, text=True, check=True)
        assert remote_scheduler(cluster, 0).is_running()
        with pytest.raises(ValueError, match="role='nanny'"):
            cluster.job_script(role="nanny")


def test_a_dead_remote_scheduler_is_noticed(
    hosts: SSHHosts, caplog: pytest.LogCaptureFixture
) -> None:
    with make_cluster(hosts, n_schedulers=2, scheduler_hosts=list(hosts.addresses)) as cluster:
        cluster.scale(jobs=1)
        cluster.wait_for_workers(1, timeout=60)
        dead_address = cluster.scheduler_addresses[1]
        assert cluster.scheduler_status == {a: "running" for a in cluster.scheduler_addresses}
        remote_scheduler(cluster, 1).kill()
        wait_until(
            lambda: cluster.scheduler_status[dead_address].startswith("dead"),
            timeout=30,
            message=lambda: cluster.scheduler_status,
        )
        assert cluster.scheduler_status[dead_address] == "dead: exited with status 137"
        assert f"dead schedulers: {dead_address} on 127.0.0.3" in repr(cluster)
        assert any(
            "scheduler 1" in r.getMessage() and "died" in r.getMessage() for r in caplog.records
        )
        with Client(cluster) as client:  # the other scheduler still serves
            assert client.submit(pow, 3, 3).result(timeout=60) == 27
    assert processes_of(cluster.name) == []


def test_a_killed_worker_is_restarted_by_its_nanny_and_the_job_goes_on(hosts: SSHHosts) -> None:
    with make_cluster(hosts, hosts=[hosts.addresses[0]], workers_per_host=2) as cluster:
        cluster.scale_up(1)  # the direct call: one more job, kept
        cluster.wait_for_workers(2, timeout=60)
        (job,) = cluster.jobs.values()
        victim = sorted(cluster.workers)[0]
        old_pid = cluster.workers[victim]["pid"]
        nanny = psutil.Process(old_pid).parent()
        assert f"--name {victim}" in " ".join(nanny.cmdline())
        os.kill(old_pid, signal.SIGKILL)  # the worker, not its nanny or the job

        def restarted() -> bool:
            workers = cluster.workers
            return victim in workers and workers[victim]["pid"] not in (old_pid, None)

        wait_until(restarted, timeout=60, interval=0.2, message=lambda: cluster.workers)
        assert psutil.Process(cluster.workers[victim]["pid"]).parent().pid == nanny.pid
        cluster.sync()
        assert job.state == JobState.RUNNING and len(cluster.jobs) == 1
        with Client(cluster) as client:
            assert list(client.map(abs, range(-8, 0))) == list(range(8, 0, -1))
    assert processes_of(cluster.name) == []


def test_workers_go_where_the_free_cores_are(tmp_path: Path) -> None:
    """127.0.0.6's sshd is pinned to one CPU: the probe sees 1 core there, all of them on .5."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs to tell a 1-core host from a bigger one")
    reason = why_not_available()
    if reason:
        pytest.skip(reason)
    pair = start_hosts(tmp_path / "sshd", ("127.0.0.5", "127.0.0.6"), cpus={"127.0.0.6": "0"})
    try:
        # the small host first: a fewest-jobs rule would start there
        with make_cluster(pair, hosts=["127.0.0.6", "127.0.0.5"]) as cluster:
            capacity = cluster.host_capacity
            assert capacity["127.0.0.6"].cores == 1
            assert capacity["127.0.0.5"].cores == len(os.sched_getaffinity(0))
            assert capacity["127.0.0.5"].memory_bytes > 2**20
            cluster.scale_up(1)  # 2 - 1 cores left on .5 against 1 - 1 on .6
            cluster.scale_up(1)  # 1 - 1 against 0: a tie, and .6 has fewer of our jobs
            placed = [r.info["host"] for r in sorted(cluster.jobs.values(), key=lambda r: r.name)]
            assert placed == ["127.0.0.5", "127.0.0.6"]
            cluster.wait_for_workers(2, timeout=60)
            assert sorted(w["host"] for w in cluster.workers.values()) == sorted(placed)
        assert processes_of(cluster.name) == []
    finally:
        stop_hosts(pair)


def test_a_per_host_address_is_bound_and_advertised(hosts: SSHHosts) -> None:
    """Loopback aliases stand for a VM whose ssh name is not its reachable address."""
    entry = {"host": hosts.addresses[0], "address": "127.0.0.12"}
    with make_cluster(hosts, hosts=[entry], scheduler_hosts=[entry]) as cluster:
        (address,) = cluster.scheduler_addresses
        assert address.startswith("tcp://127.0.0.12:")
        cluster.scale(jobs=1)
        cluster.wait_for_workers(1, timeout=60)
        assert [w["host"] for w in cluster.workers.values()] == ["127.0.0.12"]
        assert {r.info["host"] for r in cluster.jobs.values()} == {hosts.addresses[0]}
        with Client(cluster) as client:
            assert client.submit(pow, 2, 5).result(timeout=60) == 32


def test_a_prologue_that_reads_stdin_does_not_eat_the_script(hosts: SSHHosts) -> None:
    """Scripts reach the host on stdin (`bash -s`); a command reading stdin gets /dev/null."""
    prologue = [*(f"export {k}={v}" for k, v in HEARTBEAT.items()), "cat > /dev/null"]
    with make_cluster(hosts, hosts=[hosts.addresses[0]], prologue=prologue) as cluster:
        cluster.scale(jobs=1)
        cluster.wait_for_workers(1, timeout=60)
        with Client(cluster) as client:
            assert client.submit(pow, 2, 3).result(timeout=60) == 8
