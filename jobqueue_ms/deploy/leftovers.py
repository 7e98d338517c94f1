"""What a killed cluster (or worker) leaves behind, and removing it.

``close()`` (or interpreter exit) removes a cluster's temporary directory and its key file. A
process killed outright (SIGKILL, the OOM killer) cannot: its processes stop by themselves
(``--parent-pid``, ``--scheduler-lost-timeout``), but the directory -- logs, scheduler files and,
for a LocalCluster, the key file -- and a batch cluster's key file under the key directory stay.

So each cluster marks its own directory with ``owner.json`` (pid, the process's start time, the
key file it made), and every new cluster first removes the directories, and their key files, of
clusters of this user whose process is gone. The start time tells a reused pid from the owner.
A worker's same-host socket directory (runtime/localdata.py) is marked the same way by the nanny
(or the worker) that made it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

import psutil

from ..runtime.security import default_key_directory

log = logging.getLogger("jobqueue_ms.deploy")

OWNER_FILE = "owner.json"


def _started(pid: int) -> float | None:
    """When process ``pid`` started (epoch seconds), or None if there is no such process."""
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def mark_owner(cluster_dir: str, key_file: str | None) -> None:
    """Record that this process owns ``cluster_dir`` (and made ``key_file``)."""
    owner = {"pid": os.getpid(), "started": _started(os.getpid()), "keys": key_file}
    path = os.path.join(cluster_dir, OWNER_FILE)
    with open(path, "w") as f:
        json.dump(owner, f)


def sweep(parent: str | None = None) -> list[str]:
    """Remove the directories (and key files) of this user's clusters whose process is gone.

    Looks at the directories directly under ``parent`` (default: the temporary directory) that
    carry an ``owner.json`` of this user. Returns the directories removed.
    """
    parent = parent or tempfile.gettempdir()
    removed: list[str] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            marker = os.path.join(entry.path, OWNER_FILE)
            if os.lstat(marker).st_uid != os.getuid():
                continue
            with open(marker) as f:
                owner = json.load(f)
            pid = int(owner["pid"])
            started = owner.get("started")
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a cluster directory, not ours, or being written right now
        now_started = _started(pid)
        if now_started is not None and (started is None or abs(now_started - started) < 1.0):
            continue  # its owner is alive
        keys = owner.get("keys")
        if isinstance(keys, str) and keys.endswith(".keys"):
            where = os.path.dirname(os.path.abspath(keys))
            if where in (os.path.abspath(entry.path), os.path.abspath(default_key_directory())):
                try:
                    os.unlink(keys)
                except OSError:
                    pass
        shutil.rmtree(entry.path, ignore_errors=True)
        log.info("removed %s, left by a cluster whose process %d is gone", entry.path, pid)
        removed.append(entry.path)
    return removed
