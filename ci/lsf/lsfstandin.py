"""A stand-in for IBM Spectrum LSF's bsub, bjobs and bkill, for tests on machines without LSF.

There is no LSF for Debian, so ci/lsf/bin/{bsub,bjobs,bkill} run this module. It keeps the queue
in a directory ($JQMS_LSF_STATE, default /tmp/jqms-lsf-state). Each submitted job gets a detached
supervisor process that waits for free slots, runs the job script in its own process group,
enforces -W, obeys bkill and records the outcome. ci/lsf/README.md says exactly what is faithful
to LSF and what is not.

Standard library only: it must run under any python3, outside the project's venv.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

POLL_S = 0.05
UNITS = {
    "K": 1,
    "KB": 1,
    "M": 1024,
    "MB": 1024,
    "G": 1024**2,
    "GB": 1024**2,
    "T": 1024**3,
    "TB": 1024**3,
}
UNITS.update(
    {"P": 1024**4, "PB": 1024**4, "E": 1024**5, "EB": 1024**5, "Z": 1024**6, "ZB": 1024**6}
)
FINISHED = ("DONE", "EXIT")
# lsf.conf keys that the environment may override (LSF itself reads LSB_BJOBS_FORMAT from both).
ENV_KEYS = ("LSF_UNIT_FOR_LIMITS", "LSB_BJOBS_CONSISTENT_EXIT_CODE", "LSB_BJOBS_FORMAT")


class LSFError(Exception):
    """A user error: print the message (LSF style) and exit 255."""


# --------------------------------------------------------------------------- configuration


def read_conf() -> dict[str, str]:
    """Read $LSF_ENVDIR/lsf.conf (else /etc/lsf.conf); the environment overrides its keys."""
    envdir = os.environ.get("LSF_ENVDIR", "/etc")
    conf: dict[str, str] = {}
    path = Path(envdir) / "lsf.conf"
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, _, value = line.partition("=")
            conf[key.strip()] = value.strip().strip('"').strip("'")
    for key, value in os.environ.items():
        if key.startswith("JQMS_LSF_") or key in ENV_KEYS:
            conf[key] = value
    return conf


def conf_float(conf: dict[str, str], key: str, default: float) -> float:
    try:
        return float(conf.get(key, default))
    except ValueError:
        raise LSFError(
            f"{key}={conf[key]!r} in lsf.conf or the environment is not a number"
        ) from None


def state_dir() -> Path:
    root = Path(os.environ.get("JQMS_LSF_STATE", "/tmp/jqms-lsf-state"))
    (root / "jobs").mkdir(parents=True, exist_ok=True)
    (root / "active").mkdir(exist_ok=True)
    return root


@contextlib.contextmanager
def locked(root: Path):
    """Hold the queue-wide lock (job ids, dispatch decisions)."""
    with open(root / "lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------- bsub: parsing


@dataclass
class Spec:
    """What bsub was asked for, after strict parsing."""

    name: str | None = None
    array: list[int] = field(default_factory=list)  # empty: not an array job
    array_limit: int | None = None
    queue: str | None = None
    project: str | None = None
    slots: int = 1
    span_hosts: int | None = None
    rusage_mem_kb: int | None = None
    memlimit_kb: int | None = None
    memlimit_hard: bool = False
    runlimit_min: int | None = None
    out: str | None = None
    err: str | None = None
    out_overwrite: bool = False
    err_overwrite: bool = False
    cwd: str | None = None
    gpu: str | None = None
    resreq: list[str] = field(default_factory=list)


# Options the stand-in understands (each takes a value). Anything else is refused, as LSF refuses
# an option it does not know, so a typo in a template fails here instead of passing silently.
OPTIONS = {
    "-J": 1,
    "-q": 1,
    "-P": 1,
    "-n": 1,
    "-R": 1,
    "-M": 1,
    "-W": 1,
    "-o": 1,
    "-oo": 1,
    "-e": 1,
    "-eo": 1,
}
OPTIONS.update({"-cwd": 1, "-gpu": 1})


def parse_size_kb(text: str, default_unit: str, what: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)", text.strip())
    unit = (m.group(2) if m else "").upper() or default_unit.upper()
    if not m or unit not in UNITS:
        raise LSFError(f"{text}: Bad {what} value. Job not submitted.")
    return int(float(m.group(1)) * UNITS[unit])


def parse_runlimit(text: str) -> int:
    """-W [hour:]minute[/host_name|/host_model] -> minutes."""
    m = re.fullmatch(r"(?:(\d+):)?(\d+)(?:/\S+)?", text.strip())
    if not m:
        raise LSFError(f"{text}: Bad RUNLIMIT specification. Job not submitted.")
    hours, minutes = int(m.group(1) or 0), int(m.group(2))
    if m.group(1) is not None and minutes > 59:
        raise LSFError(f"{text}: Bad RUNLIMIT specification. Job not submitted.")
    return hours * 60 + minutes


def parse_array(text: str) -> tuple[str, list[int], int | None]:
    """-J name or name[1-10], name[1-10:2], name[1,3,5-7], name[1-10]%2."""
    m = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\](?:%(\d+))?", text)
    if not m:
        if "[" in text or "]" in text:
            raise LSFError(f"{text}: Bad job name. Job not submitted.")
        return text, [], None
    indices: list[int] = []
    for part in m.group(2).split(","):
        r = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part.strip())
        if not r:
            raise LSFError(f"{text}: Bad job name. Job not submitted.")
        start = int(r.group(1))
        end = int(r.group(2) or start)
        step = int(r.group(3) or 1)
        if start < 1 or end < start or step < 1:
            raise LSFError(f"{text}: Bad job name. Job not submitted.")
        indices.extend(range(start, end + 1, step))
    return m.group(1), sorted(set(indices)), int(m.group(3)) if m.group(3) else None


def parse_resreq(text: str, spec: Spec, unit: str) -> None:
    """-R: accept the sections LSF has; understand span[hosts=1|ptile=N] and rusage[mem=N]."""
    bad = LSFError(f"{text}: Bad resource requirement syntax. Job not submitted.")
    rest = text.strip()
    if not rest:
        raise bad
    while rest:
        m = re.match(r"\s*(select|order|rusage|span|same|cu|affinity)\[([^\]]*)\]\s*", rest)
        if not m:
            raise bad
        section, body = m.group(1), m.group(2)
        rest = rest[m.end() :]
        if section == "span":
            s = re.fullmatch(r"\s*(hosts|ptile)\s*=\s*(\d+)\s*", body)
            if not s:
                raise bad
            if s.group(1) == "hosts":
                spec.span_hosts = int(s.group(2))
        elif section == "rusage":
            for item in body.split(":"):
                key, eq, value = item.partition("=")
                if not eq or not value.strip():
                    raise bad
                if key.strip() == "mem":
                    # rusage mem is in LSF_UNIT_FOR_LIMITS, MB when that is not set.
                    spec.rusage_mem_kb = parse_size_kb(
                        value, unit if unit != "KB" else "MB", "rusage"
                    )
    spec.resreq.append(text)


def parse_gpu(text: str) -> None:
    if text.strip() == "-":
        return
    keys = {
        "num",
        "mode",
        "mps",
        "j_exclusive",
        "aff",
        "block",
        "gpack",
        "gvendor",
        "gmodel",
        "gtile",
    }
    keys |= {"gmem", "glink", "mig"}
    for item in text.split(":"):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in keys or not value.strip():
            raise LSFError(f"{text}: Bad GPU requirement syntax. Job not submitted.")


def apply_options(args: list[str], spec: Spec, conf: dict[str, str], where: str) -> list[str]:
    """Parse bsub options from args into spec; return what is left (the command, if any)."""
    unit = conf.get("LSF_UNIT_FOR_LIMITS", "KB").upper()
    i = 0
    while i < len(args):
        flag = args[i]
        if not flag.startswith("-") or flag == "-":
            break
        if flag not in OPTIONS:
            raise LSFError(f"bsub: illegal option -- {flag.lstrip('-')}{where}\nJob not submitted.")
        if i + 1 >= len(args):
            raise LSFError(
                f"bsub: option requires an argument -- {flag.lstrip('-')}{where}\n"
                "Job not submitted."
            )
        value = args[i + 1]
        i += 2
        if flag == "-J":
            spec.name, spec.array, spec.array_limit = parse_array(value)
        elif flag == "-q":
            spec.queue = value
        elif flag == "-P":
            spec.project = value
        elif flag == "-n":
            if not re.fullmatch(r"[1-9]\d*", value):
                raise LSFError(f"{value}: Bad argument for option -n. Job not submitted.")
            spec.slots = int(value)
        elif flag == "-R":
            parse_resreq(value, spec, unit)
        elif flag == "-M":
            spec.memlimit_hard = value.endswith("!")
            spec.memlimit_kb = parse_size_kb(value.rstrip("!"), unit, "MEMLIMIT")
        elif flag == "-W":
            spec.runlimit_min = parse_runlimit(value)
        elif flag in ("-o", "-oo"):
            spec.out, spec.out_overwrite = value, flag == "-oo"
        elif flag in ("-e", "-eo"):
            spec.err, spec.err_overwrite = value, flag == "-eo"
        elif flag == "-cwd":
            spec.cwd = value
        elif flag == "-gpu":
            parse_gpu(value)
            spec.gpu = value
    return args[i:]


def directives(script: str) -> list[tuple[int, list[str]]]:
    """Every `#BSUB ...` line (LSF reads them anywhere in the script), split like a shell would."""
    found = []
    for lineno, line in enumerate(script.splitlines(), 1):
        if line.startswith("#BSUB"):
            rest = line[len("#BSUB") :]
            if rest and not rest[0].isspace():
                raise LSFError(f"line {lineno}: {line!r}: Bad #BSUB directive. Job not submitted.")
            try:
                found.append((lineno, shlex.split(rest, comments=False)))
            except ValueError as exc:
                raise LSFError(f"line {lineno}: {line!r}: {exc}. Job not submitted.") from None
    return found


# --------------------------------------------------------------------------- bsub


def bsub(argv: list[str]) -> int:
    conf = read_conf()
    spec = Spec()
    # Parse the command line first only to find the command; options are applied after the script's
    # directives, because the command line overrides them.
    probe = Spec()
    command = apply_options(argv, probe, conf, "")
    if command:
        script = shlex.join(command) + "\n"
    else:
        script = sys.stdin.read()
        if not script.strip():
            raise LSFError("No command is specified. Job not submitted.")
    for lineno, words in directives(script):
        left = apply_options(words, spec, conf, f" (#BSUB line {lineno})")
        if left:
            raise LSFError(
                f"line {lineno}: {' '.join(left)}: Bad #BSUB directive. Job not submitted."
            )
    apply_options(argv, spec, conf, "")

    queues = conf.get("JQMS_LSF_QUEUES", "normal").split()
    queue = spec.queue or queues[0]
    if queue not in queues:
        raise LSFError(f"{queue}: No such queue. Job not submitted.")
    if spec.span_hosts not in (None, 1):
        raise LSFError(f"span[hosts={spec.span_hosts}]: only one host here. Job not submitted.")
    if spec.name is None:
        spec.name = command[0] if command else (script.strip().splitlines() or ["sh"])[0][:60]

    root = state_dir()
    with locked(root):
        counter = root / "next_id"
        job_id = int(counter.read_text()) if counter.exists() else 1
        counter.write_text(str(job_id + 1))
        jobdir = root / "jobs" / str(job_id)
        jobdir.mkdir()
    (jobdir / "script").write_text(script)
    (jobdir / "script").chmod(0o755)
    record = {
        "id": job_id,
        "spec": asdict(spec),
        "queue": queue,
        "user": getpass.getuser(),
        "uid": os.getuid(),
        "from_host": socket.gethostname(),
        "submit_cwd": os.getcwd(),
        "submit_time": time.time(),
        "env": dict(os.environ),
        "conf": conf,
        "interactive_command": bool(command),
    }
    write_json(jobdir / "job.json", record)
    for index in spec.array or [0]:
        write_json(jobdir / f"{index}.json", {"stat": "PEND", "supervisor": None})
        (root / "active" / f"{job_id}.{index}").touch()
        log = open(jobdir / f"{index}.supervisor.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "_supervise", str(job_id), str(index)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
            env={**os.environ, "JQMS_LSF_STATE": str(root)},
        )
        log.close()
        # Return only once the supervisor has registered, so a bjobs right after bsub sees the job
        # and jobs are dispatched in submission order.
        deadline = time.monotonic() + 10
        while (read_json(jobdir / f"{index}.json") or {}).get("supervisor") is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LSFError(f"Job <{job_id}>: the supervisor did not start (see {log.name}).")
            time.sleep(0.01)
    print(
        f"Job <{job_id}> is submitted to {'default ' if spec.queue is None else ''}queue <{queue}>."
    )
    return 0


# --------------------------------------------------------------------------- the supervisor


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone for our purposes (nothing reaps orphans on some CI machines)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def expand(pattern: str, job_id: int, index: int, record: dict) -> str:
    return (
        pattern.replace("%J", str(job_id))
        .replace("%I", str(index))
        .replace("%U", record["user"])
        .replace("%P", record["spec"]["project"] or "default")
    )


def output_path(
    pattern: str | None, job_id: int, index: int, record: dict, cwd: str, suffix: str
) -> Path | None:
    if pattern is None:
        return None
    text = expand(pattern, job_id, index, record)
    if text.endswith("/"):  # a directory: LSF creates it and writes <job_id>.out / .err in it
        Path(cwd, text).mkdir(parents=True, exist_ok=True)
        text += f"{job_id}.{suffix}" if index == 0 else f"{job_id}.{index}.{suffix}"
    return Path(cwd, text)


def dispatchable(root: Path, job_id: int, index: int, record: dict) -> bool:
    """Under the lock: may this element start now? FCFS over all queues, on JQMS_LSF_SLOTS slots."""
    slots_total = int(conf_float(record["conf"], "JQMS_LSF_SLOTS", os.cpu_count() or 1))
    used = 0
    array_running = 0
    first_pending = None
    for marker in sorted(
        root.joinpath("active").iterdir(), key=lambda p: tuple(map(int, p.name.split(".")))
    ):
        jid, idx = map(int, marker.name.split("."))
        state = read_json(root / "jobs" / str(jid) / f"{idx}.json")
        other = read_json(root / "jobs" / str(jid) / "job.json")
        if state is None or other is None or not alive(state.get("supervisor")):
            continue
        if state["stat"] == "RUN":
            used += other["spec"]["slots"]
            array_running += jid == job_id
        elif state["stat"] == "PEND" and first_pending is None:
            first_pending = (jid, idx)
    limit = record["spec"]["array_limit"]
    if limit is not None and array_running >= limit:
        return False
    return first_pending == (job_id, index) and used + record["spec"]["slots"] <= slots_total


def finish(
    root: Path, jobdir: Path, index: int, state: dict, stat: str, code: int | None, reason: str
) -> None:
    state.update(stat=stat, exit_code=code, exit_reason=reason, end=time.time())
    write_json(jobdir / f"{index}.json", state)
    with contextlib.suppress(FileNotFoundError):
        (root / "active" / f"{jobdir.name}.{index}").unlink()


def supervise(job_id: int, index: int) -> int:
    """Wait for slots, run one job (array element), enforce -W and bkill, record the outcome."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    root = state_dir()
    jobdir = root / "jobs" / str(job_id)
    record = read_json(jobdir / "job.json")
    assert record is not None
    spec, conf = record["spec"], record["conf"]
    state_path = jobdir / f"{index}.json"
    state = read_json(state_path) or {}
    state["supervisor"] = os.getpid()
    write_json(state_path, state)
    kill_file = jobdir / "kill"
    owner_reason = "TERM_OWNER: job killed by owner"

    while True:  # PEND
        if kill_file.exists() or (jobdir / f"{index}.kill").exists():
            finish(root, jobdir, index, state, "EXIT", None, owner_reason)
            return 0
        with locked(root):
            if dispatchable(root, job_id, index, record):
                state.update(stat="RUN", start=time.time(), exec_host=socket.gethostname())
                write_json(state_path, state)
                break
        time.sleep(POLL_S)

    host = socket.gethostname()
    slots = spec["slots"]
    cwd = record["submit_cwd"]
    if spec["cwd"]:
        wanted = expand(spec["cwd"], job_id, index, record)
        if wanted != spec["cwd"]:  # LSF creates the directory when the path has %J-style patterns
            Path(cwd, wanted).mkdir(parents=True, exist_ok=True)
        cwd = str(Path(cwd, wanted))
    if not Path(cwd).is_dir():
        cwd = "/tmp"  # LSF's default when the working directory is not there on the execution host
    out = output_path(spec["out"], job_id, index, record, cwd, "out")
    err = output_path(spec["err"], job_id, index, record, cwd, "err")
    if out is None and err is None:
        out = jobdir / f"{index}.out"  # real LSF would mail it
    hostfile = jobdir / f"{index}.hosts"
    hostfile.write_text(f"{host}\n" * slots)
    env = dict(record["env"])
    env.update(
        LSB_JOBID=str(job_id),
        LSB_JOBINDEX=str(index),
        LSB_JOBNAME=f"{spec['name']}[{index}]" if spec["array"] else spec["name"],
        LSB_QUEUE=record["queue"],
        LSB_HOSTS=" ".join([host] * slots),
        LSB_MCPU_HOSTS=f"{host} {slots}",
        LSB_DJOB_HOSTFILE=str(hostfile),
        LSB_DJOB_NUMPROC=str(slots),
        LSB_MAX_NUM_PROCESSORS=str(slots),
        LSB_JOBFILENAME=str(jobdir / "script"),
        LSB_SUB_HOST=record["from_host"],
        LSB_EXEC_CLUSTER="jqms",
        LSB_PROJECT_NAME=spec["project"] or "default",
        LSF_ENVDIR=env.get("LSF_ENVDIR", "/etc"),
    )
    if spec["array"]:
        env["LSB_JOBINDEX_END"] = str(max(spec["array"]))
    if out is not None:
        env["LSB_OUTPUTFILE"] = str(out)
    if err is not None:
        env["LSB_ERRORFILE"] = str(err)
    script = jobdir / "script"
    argv = [str(script)] if script.read_text().startswith("#!") else ["/bin/sh", str(script)]

    def open_out(path: Path, overwrite: bool):
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "wb" if overwrite else "ab")

    fout = open_out(out, spec["out_overwrite"]) if out is not None else subprocess.DEVNULL
    ferr = open_out(err, spec["err_overwrite"]) if err is not None else subprocess.STDOUT
    if out is None:  # -e without -o: stdout would be mailed
        fout = subprocess.DEVNULL
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=fout,
        stderr=ferr,
        start_new_session=True,
    )
    for fh in (fout, ferr):
        if hasattr(fh, "close"):
            fh.close()
    state.update(pid=proc.pid, pgid=proc.pid)
    write_json(state_path, state)

    seconds_per_minute = conf_float(conf, "JQMS_LSF_SECONDS_PER_MINUTE", 60)
    interval = conf_float(conf, "JQMS_LSF_TERMINATE_INTERVAL", 10)
    grace = conf_float(conf, "JQMS_LSF_RUNLIMIT_GRACE", 600)
    runlimit = (
        spec["runlimit_min"] * seconds_per_minute if spec["runlimit_min"] is not None else None
    )
    reason = ""
    kill_plan: list[
        tuple[float, int]
    ] = []  # (when, signal) still to send to the job's process group
    started = time.monotonic()

    def signal_group(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def bkill_sequence(now: float) -> list[tuple[float, int]]:
        return [
            (now, signal.SIGINT),
            (now + interval, signal.SIGTERM),
            (now + 2 * interval, signal.SIGKILL),
        ]

    while proc.poll() is None:
        now = time.monotonic()
        if not reason and (kill_file.exists() or (jobdir / f"{index}.kill").exists()):
            reason = owner_reason
            kill_plan = bkill_sequence(now)
        if not reason and runlimit is not None and now - started >= runlimit:
            # bsub -W: SIGUSR2 first, then the bkill sequence if the job outlives the grace time.
            reason = "TERM_RUNLIMIT: job killed after reaching LSF run time limit"
            kill_plan = [(now, signal.SIGUSR2)] + bkill_sequence(now + grace)
        while kill_plan and kill_plan[0][0] <= now:
            signal_group(kill_plan.pop(0)[1])
        time.sleep(POLL_S)
    rc = proc.returncode
    signal_group(signal.SIGKILL)  # what the job left behind in its process group goes with it
    code = rc if rc >= 0 else 128 - rc
    stat = "DONE" if rc == 0 and not reason else "EXIT"
    if out is not None:
        with open(out, "a") as fh:
            outcome = (
                "Successfully completed." if stat == "DONE" else f"Exited with exit code {code}."
            )
            fh.write(
                "\n------------------------------------------------------------\n"
                f"Sender: LSF System (jobqueue-ms stand-in)\n"
                f"Subject: Job {job_id}: <{env['LSB_JOBNAME']}> in cluster <jqms> "
                f"{stat.title()}\n\n"
                f"Job was executed on host(s) <{host}>, in queue <{record['queue']}>, "
                f"as user <{record['user']}>.\n"
                f"{outcome}\n" + (f"{reason}\n" if reason else "")
            )
    finish(root, jobdir, index, state, stat, code, reason)
    return 0


# --------------------------------------------------------------------------- bjobs


@dataclass
class Element:
    job_id: int
    index: int
    record: dict
    state: dict

    @property
    def stat(self) -> str:
        return self.state["stat"]


def load_elements(root: Path, job_id: int, only_index: int | None = None) -> list[Element]:
    jobdir = root / "jobs" / str(job_id)
    record = read_json(jobdir / "job.json")
    if record is None:
        return []
    clean = conf_float(read_conf(), "JQMS_LSF_CLEAN_PERIOD", 3600)
    elements = []
    for index in record["spec"]["array"] or [0]:
        if only_index is not None and index != only_index:
            continue
        state = read_json(jobdir / f"{index}.json")
        if state is None:
            continue
        if (
            state["stat"] not in FINISHED
            and state.get("supervisor")
            and not alive(state["supervisor"])
        ):
            # The supervisor died (reboot, kill -9): the job is lost, as if its host had failed.
            finish(
                root,
                jobdir,
                index,
                state,
                "EXIT",
                None,
                "TERM_ORPHAN_SYSTEM: supervisor process lost",
            )
        if state["stat"] in FINISHED and time.time() - state.get("end", 0) > clean:
            continue  # past CLEAN_PERIOD: LSF forgets finished jobs
        elements.append(Element(job_id, index, record, state))
    return elements


def parse_job_arg(arg: str) -> tuple[int, int | None]:
    m = re.fullmatch(r"(\d+)(?:\[(\d+)\])?", arg)
    if not m:
        raise LSFError(f"{arg}: Illegal job ID.")
    return int(m.group(1)), int(m.group(2)) if m.group(2) else None


def fmt_time(t: float | None) -> str:
    return time.strftime("%b %d %H:%M", time.localtime(t)) if t else "-"


FIELDS = {
    "jobid": lambda e: str(e.job_id),
    "jobindex": lambda e: str(e.index),
    "stat": lambda e: e.stat,
    "user": lambda e: e.record["user"],
    "queue": lambda e: e.record["queue"],
    "job_name": lambda e: (
        f"{e.record['spec']['name']}[{e.index}]"
        if e.record["spec"]["array"]
        else e.record["spec"]["name"]
    ),
    "proj_name": lambda e: e.record["spec"]["project"] or "default",
    "from_host": lambda e: e.record["from_host"],
    "exec_host": lambda e: (
        "-"
        if "exec_host" not in e.state
        else (f"{e.record['spec']['slots']}*" if e.record["spec"]["slots"] > 1 else "")
        + e.state["exec_host"]
    ),
    "submit_time": lambda e: fmt_time(e.record["submit_time"]),
    "start_time": lambda e: fmt_time(e.state.get("start")),
    "finish_time": lambda e: fmt_time(e.state.get("end")),
    "exit_code": lambda e: "-" if e.state.get("exit_code") is None else str(e.state["exit_code"]),
    "exit_reason": lambda e: e.state.get("exit_reason") or "-",
    "nreq_slot": lambda e: str(e.record["spec"]["slots"]),
    "nalloc_slot": lambda e: str(e.record["spec"]["slots"]) if "start" in e.state else "0",
    "run_time": lambda e: (
        f"{int((e.state.get('end') or time.time()) - e.state['start'])} second(s)"
        if "start" in e.state
        else "-"
    ),
    "memlimit": lambda e: (
        "-" if e.record["spec"]["memlimit_kb"] is None else f"{e.record['spec']['memlimit_kb']} K"
    ),
    "runtimelimit": lambda e: (
        "-"
        if e.record["spec"]["runlimit_min"] is None
        else f"{e.record['spec']['runlimit_min']}.0 min"
    ),
}
ALIASES = {"id": "jobid", "st": "stat", "name": "job_name", "q": "queue", "proj": "proj_name"}
ALIASES.update(
    {"exit": "exit_code", "from": "from_host", "exec": "exec_host", "submit": "submit_time"}
)
DEFAULT_TABLE = [
    "jobid",
    "user",
    "stat",
    "queue",
    "from_host",
    "exec_host",
    "job_name",
    "submit_time",
]


def parse_format(text: str) -> tuple[list[tuple[str, int | None]], str]:
    text = text.strip()
    delimiter = " "
    m = re.search(r"\s*delimiter='(.)'\s*$", text)
    if m:
        delimiter, text = m.group(1), text[: m.start()]
    fields = []
    for word in text.split():
        name, _, width = word.partition(":")
        name = ALIASES.get(name.lower(), name.lower())
        if name not in FIELDS:
            raise LSFError(f"Invalid field name <{word}>: Output format not valid.")
        fields.append((name, int(width.lstrip("-")) if width.lstrip("-").isdigit() else None))
    if not fields:
        raise LSFError("Output format not valid.")
    return fields, delimiter


def bjobs(argv: list[str]) -> int:
    conf = read_conf()
    noheader = show_all = False
    fmt: str | None = None
    ids: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "-noheader":
            noheader = True
        elif arg == "-a":
            show_all = True
        elif arg == "-w":
            pass  # wide: the stand-in never truncates
        elif arg in ("-o", "-u"):
            if i + 1 >= len(argv):
                raise LSFError(f"bjobs: option requires an argument -- {arg[1:]}")
            if arg == "-o":
                fmt = argv[i + 1]
            i += 1  # -u user|all: the stand-in shows every user's jobs
        elif arg.startswith("-"):
            raise LSFError(f"bjobs: illegal option -- {arg.lstrip('-')}")
        else:
            ids.append(arg)
        i += 1
    fmt = fmt or conf.get("LSB_BJOBS_FORMAT")
    fields, delimiter = parse_format(fmt) if fmt else ([(f, None) for f in DEFAULT_TABLE], None)

    root = state_dir()
    rc = 0
    rows: list[Element] = []
    errors: list[str] = []
    if ids:
        for arg in ids:
            try:
                job_id, index = parse_job_arg(arg)
            except LSFError as exc:
                errors.append(str(exc))
                rc = 255
                continue
            found = load_elements(root, job_id, index)
            if not found:
                errors.append(f"Job <{arg}> is not found")
                rc = 255
            rows.extend(found)
    else:
        job_ids = sorted(int(p.name) for p in (root / "jobs").iterdir() if p.name.isdigit())
        for job_id in job_ids:
            rows.extend(
                e for e in load_elements(root, job_id) if show_all or e.stat not in FINISHED
            )
        if not rows:
            sys.stderr.write("No unfinished job found\n" if not show_all else "No job found\n")
            if conf.get("LSB_BJOBS_CONSISTENT_EXIT_CODE", "N").upper() == "Y":
                rc = 255
    if rows:
        table = [[FIELDS[name](e) for name, _ in fields] for e in rows]
        if delimiter is None:  # the classic table: columns padded to their widest value
            header = [name.upper() for name, _ in fields]
            widths = [max(len(x) for x in col) for col in zip(header, *table, strict=True)]
            lines = ([] if noheader else [header]) + table
            out = [
                "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip()
                for line in lines
            ]
        else:
            cut = [
                [v[:w] if w else v for v, (_, w) in zip(line, fields, strict=True)]
                for line in table
            ]
            header = [name.upper() for name, _ in fields]
            out = ([] if noheader else [delimiter.join(header)]) + [
                delimiter.join(line) for line in cut
            ]
        sys.stdout.write("\n".join(out) + "\n")
        sys.stdout.flush()
    for msg in errors:
        sys.stderr.write(msg + "\n")
    return rc


# --------------------------------------------------------------------------- bkill


def bkill(argv: list[str]) -> int:
    ids = []
    for arg in argv:
        if arg.startswith("-"):
            raise LSFError(f"bkill: illegal option -- {arg.lstrip('-')}")
        ids.append(arg)
    if not ids:
        raise LSFError("bkill: a job ID, or 0 for all your unfinished jobs, is required.")
    root = state_dir()
    rc = 0
    if ids == ["0"]:
        targets = [(int(p.name.split(".")[0]), None) for p in (root / "active").iterdir()]
        targets = sorted(set(targets))
        if not targets:
            sys.stderr.write("No unfinished job found\n")
            return 255
    else:
        targets = []
        for arg in ids:
            try:
                targets.append(parse_job_arg(arg))
            except LSFError as exc:
                sys.stderr.write(f"{exc}\n")
                rc = 255
    for job_id, index in targets:
        label = f"{job_id}" if index is None else f"{job_id}[{index}]"
        elements = load_elements(root, job_id, index)
        if not elements:
            sys.stderr.write(f"Job <{label}>: No matching job found\n")
            rc = 255
        elif all(e.stat in FINISHED for e in elements):
            sys.stderr.write(f"Job <{label}>: Job has already finished\n")
            rc = 255
        else:
            (root / "jobs" / str(job_id) / ("kill" if index is None else f"{index}.kill")).touch()
            print(f"Job <{label}> is being terminated")
    return rc


# --------------------------------------------------------------------------- entry point


def main(command: str, argv: list[str]) -> int:
    try:
        if command == "bsub":
            return bsub(argv)
        if command == "bjobs":
            return bjobs(argv)
        if command == "bkill":
            return bkill(argv)
        if command == "_supervise":
            return supervise(int(argv[0]), int(argv[1]))
    except LSFError as exc:
        sys.stdout.flush()
        sys.stderr.write(f"{exc}\n")
        return 255
    sys.stderr.write(f"lsfstandin: unknown command {command!r}\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
