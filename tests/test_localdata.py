"""Same-host shortcuts over private Unix sockets (runtime/localdata.py).

Real worker processes and real sockets: a client and a second worker on this host are redirected
from the encrypted TCP data port to the worker's Unix socket; a socket that is not private is
refused; a SIGKILLed worker's replacement serves on the same socket; single-task results come
straight from the worker to the client's socket; nothing is left in the temp directory.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import psutil
import pytest
import zmq
from helpers import wait_until

from jobqueue_ms import Client, LocalCluster
from jobqueue_ms.runtime import localdata

cloudpickle.register_pickle_by_value(sys.modules[__name__])

BIG = 4_000_000  # bytes: far over the inline limit, so the value stays on its worker


@pytest.fixture(autouse=True)
def _fast_heartbeats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBQUEUE_MS_HEARTBEAT_TIMEOUT", "3")
    monkeypatch.setenv("JOBQUEUE_MS_HEARTBEAT_INTERVAL", "0.25")


def blob(i: int) -> bytes:
    return bytes([i % 256]) * BIG


def checksum(b: bytes) -> tuple[int, int]:
    return len(b), b[0]


def worker_status(client: Client, name: str | None = None) -> dict:
    """The worker's last heartbeat status, as its scheduler shows it (waits for the first)."""

    def status() -> dict | None:
        workers = client.scheduler_info()[0]["workers"]
        w = next((w for w in workers if name is None or w["name"] == name), None)
        return w if w is not None and "memory_bytes" in w and w["memory_bytes"] else None

    return wait_until(status, timeout=30)  # type: ignore[return-value]


def expect_served(client: Client, tcp: int, local: int, redirected: int, name: str = "") -> None:
    """Wait for the worker's GETs answered, by way, to reach these counts (heartbeats lag)."""
    want = {"tcp": tcp, "local": local, "redirected": redirected}
    wait_until(
        lambda: worker_status(client, name or None)["data_served"] == want,
        timeout=10,
        message=lambda: f"served {worker_status(client, name or None)['data_served']}, want {want}",
    )


@pytest.fixture
def extra_worker() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        p.terminate()
        p.wait(timeout=30)


def test_values_on_this_host_move_over_the_worker_s_private_unix_socket(
    extra_worker: list[subprocess.Popen[bytes]],
) -> None:
    with LocalCluster(n_schedulers=1, n_workers=1, threads_per_worker=1) as cluster:
        cluster.wait_for_workers(1, timeout=30)
        with Client(cluster) as client:
            a = worker_status(client)
            address = a["local_address"]
            assert address.startswith("ipc://"), a
            path = Path(address[len("ipc://") :])
            info = path.parent.stat()
            assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
            assert stat.S_ISSOCK(path.stat().st_mode)

            # the client: redirected once, then straight to the socket
            assert client.submit(blob, 1).result(timeout=30) == blob(1)
            assert client.gather([client.submit(blob, i) for i in (2, 3)]) == [blob(2), blob(3)]
            expect_served(client, 0, 2, 1)

            # a second worker on this host takes an input from the first one the same way
            big = client.submit(blob, 7)
            big.result(timeout=30)
            extra_worker.append(
                subprocess.Popen(
                    [sys.executable, "-m", "jobqueue_ms", "worker", "--name", "second"]
                    + ["--scheduler", cluster.scheduler_addresses[0], "--resources", "B=1"]
                    + ["--keyfile", cluster.security.path, "--parent-pid", str(os.getpid())]
                )
            )
            cluster_workers = lambda: {w["name"] for w in client.scheduler_info()[0]["workers"]}  # noqa: E731
            wait_until(lambda: "second" in cluster_workers(), timeout=30)
            on_b = client.options(resources={"B": 1}).submit(checksum, big)
            assert on_b.result(timeout=30) == (BIG, 7)
            expect_served(client, 0, 4, 2, a["name"])
            second = worker_status(client, "second")["local_address"]
            extra_worker[0].terminate()
            assert extra_worker[0].wait(timeout=30) == 0
            assert not Path(second[len("ipc://") :]).parent.exists()  # its nanny removed it

            # SIGKILLed: the nanny's replacement listens on the same socket
            os.kill(a["pid"], signal.SIGKILL)
            wait_until(
                lambda: (
                    (w := client.scheduler_info()[0]["workers"])
                    and w[0]["pid"] != a["pid"]
                    and w[0]["name"] == a["name"]
                ),
                timeout=30,
            )
            assert worker_status(client)["local_address"] == address
            assert client.submit(blob, 9).result(timeout=30) == blob(9)
            expect_served(client, 0, 1, 1)
    assert not path.parent.exists()


def test_a_socket_that_is_not_private_is_refused_and_tcp_used() -> None:
    with LocalCluster(n_schedulers=1, n_workers=1, threads_per_worker=1) as cluster:
        cluster.wait_for_workers(1, timeout=30)
        with Client(cluster) as client:
            path = Path(worker_status(client)["local_address"][len("ipc://") :])
            path.parent.chmod(0o755)  # others may enter now: the client must not use it
            try:
                assert client.submit(blob, 5).result(timeout=30) == blob(5)
                assert client.submit(blob, 6).result(timeout=30) == blob(6)
            finally:
                path.parent.chmod(0o700)
            expect_served(client, 2, 0, 1)


def inc(x: int) -> int:
    return x + 1


def test_single_task_results_also_come_straight_from_the_worker() -> None:
    """A caller waiting on one task at a time gets its result a hop sooner (not through the
    scheduler, which still sends its copy: the futures complete once, with the right value)."""
    with LocalCluster(n_schedulers=1, n_workers=1, threads_per_worker=1) as cluster:
        cluster.wait_for_workers(1, timeout=30)
        client = Client(cluster)
        reply_dir = Path(client.reply_address[len("ipc://") :]).parent
        assert stat.S_IMODE(reply_dir.stat().st_mode) == 0o700
        try:
            futures = [client.submit(inc, 0)]
            for i in range(50):
                assert client.submit(inc, i).result(timeout=30) == i + 1
            assert futures[0].result(timeout=30) == 1
            direct = client.counters["direct_results"]
            assert direct >= 25, client.counters  # the scheduler's copy may win now and then
            assert client.submit(blob, 3).result(timeout=30) == blob(3)  # a location, then
            assert client.counters["direct_results"] == direct + 1
            # batches go the usual way: one message for many results is as cheap as it gets
            assert client.gather(client.submit_many(inc, range(2000))) == list(range(1, 2001))
            assert client.futures_pending == 0
            done = lambda: client.scheduler_info()[0]["counters"]["tasks_done"]  # noqa: E731
            wait_until(lambda: done() == 1 + 50 + 1 + 2000, timeout=30, message=lambda: done())
        finally:
            client.shutdown()
        assert not reply_dir.exists()


def test_turned_off_values_move_over_encrypted_tcp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(localdata.ENV, "0")
    with LocalCluster(n_schedulers=1, n_workers=1, threads_per_worker=1) as cluster:
        cluster.wait_for_workers(1, timeout=30)
        with Client(cluster) as client:
            assert client.reply_address == ""
            assert client.submit(blob, 4).result(timeout=30) == blob(4)
            assert [client.submit(inc, i).result(timeout=30) for i in range(5)] == [1, 2, 3, 4, 5]
            assert client.counters["direct_results"] == 0
            assert worker_status(client)["local_address"] == ""
            expect_served(client, 1, 0, 0)


def test_trusted_only_for_this_user_s_socket_in_a_private_directory(tmp_path: Path) -> None:
    ctx = zmq.Context()
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    sock = localdata.listen(ctx, str(private), 1 << 20)
    try:
        address = localdata.endpoint(str(private))
        assert localdata.trusted(address)
        os.symlink(private / localdata.SOCKET_NAME, tmp_path / "link")
        assert not localdata.trusted(f"ipc://{tmp_path / 'link'}")  # not the socket itself
        (private / "file").write_text("")
        assert not localdata.trusted(f"ipc://{private / 'file'}")  # not a socket
        assert not localdata.trusted(f"ipc://{private / 'absent'}")
        assert not localdata.trusted("tcp://127.0.0.1:1")
        assert not localdata.trusted(None)  # type: ignore[arg-type]
        private.chmod(0o750)
        assert not localdata.trusted(address)  # a group may enter
        assert localdata.connect(ctx, address, 1 << 20) is None  # so nobody connects there
        with pytest.raises(PermissionError, match="mode 0700"):
            localdata.listen(ctx, str(private), 1 << 20)
    finally:
        private.chmod(0o700)
        sock.close(linger=0)
        ctx.term()


def test_a_sigkilled_nanny_s_socket_directory_is_swept_by_the_next_cluster() -> None:
    with LocalCluster(n_schedulers=1, n_workers=1, threads_per_worker=1) as cluster:
        cluster.wait_for_workers(1, timeout=30)
        with Client(cluster) as client:
            status = worker_status(client)
        directory = Path(status["local_address"][len("ipc://") :]).parent
        nanny = psutil.Process(status["pid"]).parent()
        nanny.kill()  # SIGKILL: it cannot remove its directory; the worker follows it out
        wait_until(lambda: not psutil.pid_exists(status["pid"]), timeout=30)
        assert directory.exists()
    with LocalCluster(n_schedulers=1, n_workers=0):
        assert not directory.exists()


def test_the_example_in_docs_security_runs(capsys: pytest.CaptureFixture[str]) -> None:
    text = (Path(__file__).parent.parent / "docs" / "security.md").read_text()
    block = text.split("<!-- example: same-host -->", 1)[1].split("```python\n", 1)[1]
    exec(compile(block.split("```", 1)[0], "security.md", "exec"), {"__name__": "__main__"})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "10000000" and lines[1] == "[3, 3, 3]", lines
    assert lines[2].startswith("ipc://") and lines[4].startswith("ipc://"), lines
    assert lines[3].startswith("{'direct_results': "), lines
