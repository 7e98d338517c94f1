"""Secure by default: CurveZMQ keys per cluster, key files, refusals, limits (docs/security.md).

Real processes on loopback. An *outsider* is a peer without the cluster's keys (or with another
cluster's); a *member* holds them. Outsiders must not get a single frame to a parser; members
that misbehave are bounded (message size, tasks per client) and never crash a process
(tests/test_drills.py fuzzes members).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import psutil
import pytest
import zmq
from helpers import wait_until

from jobqueue_ms import Client, LocalCluster
from jobqueue_ms.runtime import protocol
from jobqueue_ms.runtime.errors import TooManyTasksError
from jobqueue_ms.runtime.protocol import Kind
from jobqueue_ms.runtime.scheduler import Scheduler
from jobqueue_ms.runtime.security import Security, SecurityError

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(n_schedulers=2, n_workers=1, threads_per_worker=2) as c:
        c.wait_for_workers(1)
        yield c


def _secrets(sec: Security) -> list[str]:
    return [sec.server_secret.decode(), sec.client_secret.decode()]


def _process_text(pid: int) -> str:
    """What other users can read of a process: its command line and environment."""
    p = psutil.Process(pid)
    return " ".join(p.cmdline()) + " " + " ".join(f"{k}={v}" for k, v in p.environ().items())


def _cluster_pids(cluster: LocalCluster) -> list[int]:
    pids = [p.pid for p in cluster._scheduler_procs]
    for proc in cluster._procs.values():
        pids += [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children())]
    return pids


# ---------------------------------------------------------------------------- key files
def test_every_cluster_has_its_own_private_key_file_removed_at_close(tmp_path: Path) -> None:
    with LocalCluster(n_workers=0) as a, LocalCluster(n_workers=0) as b:
        for c in (a, b):
            path = Path(str(c.security.path))
            assert c.security.encrypted
            assert path.stat().st_mode & 0o777 == 0o600
            assert path.parent.stat().st_mode & 0o777 == 0o700
        assert a.security.client_public != b.security.client_public
        paths = [Path(str(a.security.path)), Path(str(b.security.path))]
    assert not any(p.exists() for p in paths)
    kept = LocalCluster(n_workers=0, keep_keys=True, name=f"kept-{os.getpid()}")
    kept.close()
    path = Path(str(kept.security.path))
    try:
        assert path.exists() and Security.load(str(path)) == kept.security
    finally:
        path.unlink()


def test_key_files_readable_by_others_are_refused(tmp_path: Path) -> None:
    sec = Security.generate(str(tmp_path / "keys"), name="c")
    os.chmod(str(sec.path), 0o644)
    with pytest.raises(SecurityError, match=r"readable by others \(mode 0o644\).*chmod 600"):
        Security.load(str(sec.path))
    (tmp_path / "open").mkdir(mode=0o755)
    os.chmod(tmp_path / "open", 0o755)
    with pytest.raises(SecurityError, match="open to other users.*chmod 700"):
        Security.generate(str(tmp_path / "open"), name="c")
    with pytest.raises(SecurityError, match="does not exist"):
        Security.load(str(tmp_path / "missing.keys"))
    with pytest.raises(SecurityError, match="already exists"):
        Security.generate(str(tmp_path / "keys"), name="c")


def test_command_lines_env_job_scripts_and_scheduler_files_carry_the_path_only(
    cluster: LocalCluster,
) -> None:
    secrets = _secrets(cluster.security)
    texts = [_process_text(pid) for pid in _cluster_pids(cluster)]
    texts.append(cluster.job_script())
    files = list(Path(cluster.cluster_dir).glob("scheduler-*.json"))
    texts += [f.read_text() for f in files]
    assert len(files) == 2 and len(texts) >= 6
    for text in texts:
        assert not any(s in text for s in secrets)
    assert str(cluster.security.path) in cluster.job_script()
    for f in files:
        data = json.loads(f.read_text())
        assert data["security"] == "curve" and data["keyfile"] == cluster.security.path
    assert repr(cluster.security).startswith("Security(curve, keyfile=")
    assert not any(s in repr(cluster.security) for s in secrets)


def test_batch_job_scripts_name_the_key_file_on_the_shared_directory(tmp_path: Path) -> None:
    from jobqueue_ms.batch.slurm import SLURMCluster

    class Rendered(SLURMCluster):  # renders for real, starts nothing
        def _start_schedulers(self) -> list[str]:
            return ["tcp://10.0.0.1:4000"]

    cluster = Rendered(
        cores=1, memory="1GiB", walltime="00:10:00", shared_directory=str(tmp_path / "shared")
    )
    try:
        script = cluster.job_script()
        keyfile = str(cluster.security.path)
        assert keyfile.startswith(str(tmp_path / "shared" / "keys"))
        assert f"--keyfile {keyfile}" in script
        assert not any(s in script for s in _secrets(cluster.security))
    finally:
        cluster.close()
    assert not os.path.exists(keyfile)


# ---------------------------------------------------------------------------- refusals
def test_outsiders_are_refused_at_once_with_a_clear_error(cluster: LocalCluster) -> None:
    address = cluster.scheduler_addresses[0]
    other = Security.generate(os.path.dirname(str(cluster.security.path)), name="other")
    try:
        for sec, reason in [
            (other, "does not accept these keys"),
            (Security.insecure_plaintext(), "requires CurveZMQ"),
        ]:
            t0 = time.monotonic()
            with pytest.raises(SecurityError, match=reason):
                Client(address, security=sec, timeout=30)
            assert time.monotonic() - t0 < 5  # the handshake says so; no 30 s timeout
    finally:
        other.remove()
    with pytest.raises(SecurityError, match="no key file"):
        Client("tcp://127.0.0.1:1", timeout=1)  # nothing known about this address


def test_a_plaintext_scheduler_refuses_curve_clients_and_the_opt_out_works() -> None:
    plain = Security.insecure_plaintext()
    with LocalCluster(n_workers=1, security=plain) as c, Client(c) as client:
        assert client.submit(sum, [1, 2]).result(timeout=30) == 3
        files = list(Path(c.cluster_dir).glob("scheduler-*.json"))
        assert json.loads(files[0].read_text())["security"] == "plaintext"
        assert "--insecure-plaintext" in c.job_script()
        keys = Security.new()
        # which of the two the handshake reports first depends on timing; both say why
        with pytest.raises(SecurityError, match="does not use CurveZMQ|runs --insecure-plaintext"):
            Client(c.scheduler_addresses[0], security=keys, timeout=30)


def _outsider_flood(address: str, n_sockets: int, security: Security | None = None) -> None:
    """Connect, send and reconnect many times as an outsider (no keys, or someone else's)."""
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        for _ in range(n_sockets):
            sec = security or Security.insecure_plaintext()
            s = sec.socket(ctx, zmq.DEALER, server=False)
            s.connect(address)
            for _ in range(10):
                try:
                    s.send_multipart(protocol.pack(Kind.SHUTDOWN, None), zmq.NOBLOCK)
                except zmq.Again:
                    pass
            time.sleep(0.02)  # let the handshake happen (and fail) before closing
            s.close(0)
    finally:
        ctx.term()


def test_outsiders_cannot_reach_a_parser_and_are_logged_once(tmp_path: Path) -> None:
    with LocalCluster(n_schedulers=1, n_workers=1) as c, Client(c) as client:
        c.wait_for_workers(1)
        address = c.scheduler_addresses[0]
        data_address = next(iter(c.workers.values()))["data_address"]
        stranger = Security.generate(str(tmp_path / "k"), name="stranger")  # another cluster
        # knows the server's public key (not secret) but has its own client key
        impostor = Security(
            c.security.server_public, b"", stranger.client_public, stranger.client_secret
        )
        for target in (address, data_address):
            _outsider_flood(target, 20)  # no keys at all
            _outsider_flood(target, 20, stranger)
            _outsider_flood(target, 20, impostor)
        assert client.submit(sum, [2, 3]).result(timeout=30) == 5  # still serving
        info = c.scheduler_info(max_age=0)[0]
        counters = info["counters"]
        assert counters["dropped_frames"] == 0  # not one outsider frame reached the parser
        assert counters["refused_keys"] >= 20 and counters["refused_handshakes"] >= 40
        assert info["workers"][0]["dropped_frames"] == 0
        log_text = (Path(c.cluster_dir) / "scheduler-0.log").read_text()
    # once per peer and key, and once a minute for failed handshakes: not once per attempt
    assert len(re.findall("refused a connection from", log_text)) == 1
    assert len(re.findall("handshake failed", log_text)) == 1


# A peer of another version: refused with both versions named, logged once per kind of peer
# (tests/test_runtime.py::test_version_mismatch_is_refused_naming_both_versions_and_logged_once).


# ---------------------------------------------------------------------------- limits
def test_a_member_sending_an_oversized_frame_is_cut_off_and_the_scheduler_lives(
    tmp_path: Path,
) -> None:
    limit = 1 << 20
    with LocalCluster(n_workers=1, max_message_bytes=limit) as c, Client(c) as client:
        pid = c._scheduler_procs[0].pid
        rss_before = psutil.Process(pid).memory_info().rss
        ctx: zmq.Context[Any] = zmq.Context()
        try:
            s = c.security.socket(ctx, zmq.DEALER, server=False)
            s.connect(c.scheduler_addresses[0])
            for _ in range(20):  # 20 x 8 MiB would be 160 MiB if it were buffered
                s.send_multipart([Kind.SUBMIT, b"\0" * (8 << 20)])
            s.close(1000)
        finally:
            ctx.term()
        assert client.submit(sum, [1, 2]).result(timeout=30) == 3
        grew = psutil.Process(pid).memory_info().rss - rss_before
        assert grew < 40 << 20, grew
        # the client knows the limit and refuses, before sending, what the scheduler would drop
        with pytest.raises(ValueError, match=r"max_message_bytes.*client.scatter"):
            client.submit(len, b"x" * (2 << 20))
        with pytest.raises(ValueError, match="max_message_bytes"):
            client.scatter(b"x" * (2 << 20))
        assert client.futures_pending == 0  # nothing half-submitted
        # a result that could never be sent fails loudly instead of getting lost
        with pytest.raises(ValueError, match="result is .* more than max_message_bytes"):
            client.submit(bytes, 2 << 20).result(timeout=30)
        assert len(client.submit(bytes, 500_000).result(timeout=30)) == 500_000


def test_one_client_cannot_hold_more_than_its_limit_of_tasks() -> None:
    sched = Scheduler(port=0, max_tasks_per_client=1000)
    address = sched.start()
    noisy, other = Client(address), Client(address)  # no workers: the tasks stay queued
    try:
        noisy.submit_many(abs, range(900))
        with pytest.raises(TooManyTasksError, match="1,000 each"):
            noisy.submit_many(abs, range(200))  # refused whole, before anything is sent
        assert noisy.futures_pending == 900
        assert len(other.submit_many(abs, range(1000))) == 1000  # its own limit
        wait_until(lambda: sched.info()["tasks_total"] == 1900, timeout=30)
        for c in (noisy, other):
            c.shutdown(wait=False, cancel_futures=True)
        # a member that ignores the limit gets the excess failed at once, not queued
        failed = _raw_submit(address, sched.security, n=1500)
        assert len(failed) == 500 and all(etype == "TooManyTasksError" for etype in failed)
        assert sched.info()["counters"]["tasks_refused_limit"] == 500
    finally:
        sched.stop()


def _raw_submit(address: str, security: Security, n: int) -> list[str]:
    """Say hello as a client and submit ``n`` tasks in one message; the failures reported."""
    blob = protocol.dumps_function(abs)
    fhash = b"h" * 16
    payload = protocol.dumps_user(((-1,), {}))
    ctx: zmq.Context[Any] = zmq.Context()
    failed: list[str] = []
    try:
        s = security.socket(ctx, zmq.DEALER, server=False)
        s.connect(address)
        hello = {"role": "client", "versions": protocol.versions(), "client_id": "raw"}
        s.send_multipart(protocol.pack(Kind.HELLO, {**hello, "name": "raw"}))
        assert s.poll(10_000) and s.recv_multipart()[0] == Kind.WELCOME
        tasks = [(k, fhash, payload, None, 0, 0, None) for k in range(1, n + 1)]
        s.send_multipart(protocol.pack(Kind.SUBMIT, {"funcs": {fhash: blob}, "tasks": tasks}))
        deadline = time.monotonic() + 30
        while len(failed) < n - 1000 and time.monotonic() < deadline:
            if s.poll(500):
                frames = s.recv_multipart()
                if frames[0] == Kind.RESULTS:
                    for _, status, value in protocol.loads_control(frames[1])["results"]:
                        if status == 3:  # failed by the scheduler
                            failed.append(value[0])
        s.close(0)
    finally:
        ctx.term()
    return failed


def test_schedulers_and_workers_listen_on_loopback_not_every_interface(
    cluster: LocalCluster,
) -> None:
    listening = []
    for pid in _cluster_pids(cluster):
        for conn in psutil.Process(pid).net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN:
                listening.append(conn.laddr.ip)
    assert listening and set(listening) == {"127.0.0.1"}


# ---------------------------------------------------------------------------- by hand
def test_keys_new_then_scheduler_worker_and_client_started_by_hand(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "jobqueue_ms"]
    out = subprocess.run(
        [*run, "keys", "new", "--directory", str(tmp_path / "k"), "--name", "svc"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    keyfile = out.stdout.strip()
    assert keyfile == str(tmp_path / "k" / "svc.keys")
    sfile = tmp_path / "sched.json"
    sched = subprocess.Popen(
        [*run, "scheduler", "--scheduler-file", str(sfile), "--keyfile", keyfile],
        start_new_session=True,
    )
    worker = None
    try:
        wait_until(sfile.exists, timeout=30)
        assert json.loads(sfile.read_text())["keyfile"] == keyfile
        # the worker finds the key file through the scheduler file
        worker = subprocess.Popen(
            [*run, "worker", "--scheduler-file", str(sfile)], start_new_session=True
        )
        with Client(scheduler_file=str(sfile)) as client:
            assert client.submit(pow, 3, 4).result(timeout=60) == 81
        without = subprocess.run(
            [*run, "worker", "--scheduler", json.loads(sfile.read_text())["address"]],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if k != "JOBQUEUE_MS_KEYFILE"},
        )
        assert without.returncode != 0 and "no key file" in without.stderr
    finally:
        for p in (worker, sched):
            if p is not None:
                p.terminate()
                p.wait(30)
    assert os.path.exists(keyfile)  # the scheduler did not make it, so it does not remove it


def test_a_member_cannot_cancel_or_release_another_clients_tasks(cluster: LocalCluster) -> None:
    """Keys of one client's tasks are its own: a crafted key cannot reach another's task."""
    address = cluster.scheduler_addresses[0]
    with Client(address) as victim:
        slow = victim.submit(time.sleep, 1.0)
        ctx: zmq.Context[Any] = zmq.Context()
        try:
            s = cluster.security.socket(ctx, zmq.DEALER, server=False)
            s.connect(address)
            hello = {"role": "client", "versions": protocol.versions(), "client_id": "x"}
            s.send_multipart(protocol.pack(Kind.HELLO, {**hello, "name": "attacker"}))
            assert s.poll(10_000) and s.recv_multipart()[0] == Kind.WELCOME
            # every other client's task number, as the scheduler numbers them internally
            keys = [(index << 40) | k for index in range(1, 50) for k in range(1, 20)]
            s.send_multipart(protocol.pack(Kind.CANCEL, keys))
            s.send_multipart(protocol.pack(Kind.RELEASE, keys))
            s.close(100)
        finally:
            ctx.term()
        assert slow.result(timeout=30) is None  # ran to the end
    dropped = sum(i["counters"]["dropped_frames"] for i in cluster.scheduler_info(max_age=0))
    assert dropped >= 2
