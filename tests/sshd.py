"""Real sshd instances on loopback addresses, one per "host", for the SSH tests.

Each instance has its own config, pidfile and log in a temporary directory, listens on one
address (127.0.0.2, 127.0.0.3 ...) and accepts only a test key generated into that directory
(``AuthorizedKeysFile`` is an absolute path there): the real ``~/.ssh`` is not touched.
Use ``start_hosts(...)`` and ``stop_hosts(...)`` from a fixture in the test module.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from helpers import wait_until

SSHD = Path("/usr/sbin/sshd")
PREFERRED_PORT = 2222


@dataclass
class SSHHosts:
    """Running sshd instances sharing one port, one per address, and how to log in."""

    addresses: tuple[str, ...]
    port: int
    key: Path
    directory: Path
    pidfiles: list[Path] = field(default_factory=list)

    @property
    def ssh_options(self) -> list[str]:
        """Client options for SSHCluster(ssh_options=...): the test key, no known_hosts."""
        return [
            "-i",
            str(self.key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
        ]

    def logins(self, address: str) -> int:
        """How many logins the sshd of ``address`` has accepted so far (from its log)."""
        log = self.directory / f"sshd-{address}.log"
        if not log.exists():
            return 0
        return log.read_text(errors="replace").count("Accepted publickey for ")


def why_not_available() -> str | None:
    """Why the SSH tests cannot run here, or None."""
    if not SSHD.exists() or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "ssh: sshd/ssh not installed (apt-get install openssh-server openssh-client)"
    if os.geteuid() != 0:
        return "ssh: starting sshd instances needs root (privilege separation)"
    return None


def _port_free(address: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((address, port))
        except OSError:
            return False
        return True


def _free_port(addresses: tuple[str, ...]) -> int:
    """2222 when it is free on every address (ci/ssh/start may hold it), else another port."""
    for port in (PREFERRED_PORT, *range(2223, 2300)):
        if all(_port_free(a, port) for a in addresses):
            return port
    raise RuntimeError(f"no free port in 2222..2299 on {addresses}")


def _login_ok(hosts: SSHHosts, address: str) -> bool:
    argv = ["ssh", "-p", str(hosts.port), "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]
    proc = subprocess.run(
        [*argv, *hosts.ssh_options, address, "true"],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
    )
    return proc.returncode == 0


def start_hosts(
    directory: Path,
    addresses: tuple[str, ...] = ("127.0.0.2", "127.0.0.3"),
    cpus: Mapping[str, str] | None = None,
) -> SSHHosts:
    """Start one key-only sshd per address in ``directory``; return once each accepts a login.

    ``cpus`` pins the sshd of an address (and so every login and process there) to CPUs, like
    ``{"127.0.0.3": "0"}`` (``taskset -c 0``): a "host" with fewer cores than this machine.
    """
    directory.mkdir(parents=True, exist_ok=True)
    key = directory / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    authorized = directory / "authorized_keys"
    authorized.write_text(key.with_suffix(".pub").read_text())
    authorized.chmod(0o600)
    host_key = directory / "host_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege-separation directory
    directory.chmod(0o700)
    hosts = SSHHosts(addresses=addresses, port=_free_port(addresses), key=key, directory=directory)
    try:
        for address in addresses:
            conf = directory / f"sshd-{address}.conf"
            pidfile = directory / f"sshd-{address}.pid"
            conf.write_text(
                f"Port {hosts.port}\nListenAddress {address}\nHostKey {host_key}\n"
                f"PidFile {pidfile}\nAuthorizedKeysFile {authorized}\n"
                "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                "MaxStartups 100:30:200\nMaxSessions 100\n"
                # /tmp above the key directory is world-writable: StrictModes would refuse it.
                "StrictModes no\n"
            )
            subprocess.run([str(SSHD), "-t", "-f", str(conf)], check=True, capture_output=True)
            log = directory / f"sshd-{address}.log"
            pin = ["taskset", "-c", cpus[address]] if cpus and address in cpus else []
            subprocess.run([*pin, str(SSHD), "-f", str(conf), "-E", str(log)], check=True)
            hosts.pidfiles.append(pidfile)
        for address in addresses:
            wait_until(
                lambda a=address: _login_ok(hosts, a), timeout=30, message=f"sshd on {address}"
            )
    except BaseException:
        stop_hosts(hosts)
        raise
    return hosts


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop_hosts(hosts: SSHHosts) -> None:
    """Stop every sshd of ``hosts`` (by pidfile) and wait until each is gone."""
    pids = []
    for pidfile in hosts.pidfiles:
        if pidfile.exists():
            pid = int(pidfile.read_text().split()[0])
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            pids.append(pid)
    for pid in pids:
        wait_until(lambda p=pid: not _alive(p), timeout=10, message=f"sshd {pid} to exit")
