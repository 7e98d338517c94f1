"""Network interface name -> this host's IPv4 address on it (``"ib0"`` -> ``"10.1.2.3"``).

One lookup for every caller that takes ``interface=`` / ``--interface``: the worker and scheduler
commands, the batch clusters (for schedulers they start here) and the MPI bootstrap. Each adds
what the user can do instead to the message; the message itself always lists the interfaces this
host has, with their addresses.
"""

from __future__ import annotations

import socket

__all__ = ["InterfaceError", "ipv4_address"]


class InterfaceError(ValueError):
    """``interface`` does not exist on this host, or has no IPv4 address.

    ``str(exc)`` names the interface, the host and the known interfaces with their addresses.
    """

    def __init__(self, interface: str, exists: bool, known: str) -> None:
        self.interface = interface
        self.exists = exists
        self.known = known
        what = "has no IPv4 address" if exists else "does not exist"
        host = socket.gethostname()
        super().__init__(f"interface={interface!r} {what} on {host}; known: {known}")


def ipv4_address(interface: str) -> str:
    """The first IPv4 address of network interface ``interface`` here; InterfaceError if none."""
    import psutil  # not at import time: the worker command must start fast

    interfaces = psutil.net_if_addrs()
    for address in interfaces.get(interface, []):
        if address.family == socket.AF_INET:
            return str(address.address)
    known = ", ".join(
        f"{name} ({', '.join(a.address for a in addrs if a.family == socket.AF_INET) or 'no IPv4'})"
        for name, addrs in sorted(interfaces.items())
    )
    raise InterfaceError(interface, interface in interfaces, known)
