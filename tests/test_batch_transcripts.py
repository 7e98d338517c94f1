"""Queue commands replayed from transcripts, through run_command, for every batch system.

No batch system runs here: fake ``sbatch``, ``squeue``, ``qsub``, ``bjobs``... on PATH replay
(argv pattern, stdout, exit code) steps in order and record what they were called with, so each
test sees the exact commands a cluster runs and what it makes of each answer. The schedulers are
real local processes (scheduler_placement="local"). Real SLURM and SGE, the PBS shim and the LSF
stand-in are exercised in test_batch_real.py.
"""

from __future__ import annotations

import getpass
import itertools
import json
import os
import re
import subprocess
import sys
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from jobqueue_ms.batch.base import BatchCluster, CommandError, run_command
from jobqueue_ms.config import Config
from jobqueue_ms.deploy import cluster as cluster_module
from jobqueue_ms.deploy.cluster import ClusterError, JobRecord, JobState

QUEUE_COMMANDS = (
    "sbatch squeue scancel scontrol sacct qsub qstat qdel qacct bsub bjobs bkill".split()
)

REPLAY = textwrap.dedent(
    """
    import fcntl, json, os, re, sys
    path = os.environ["JQMS_TRANSCRIPT"]
    argv = [os.path.basename(sys.argv[0]), *sys.argv[1:]]
    joined = " ".join(argv)
    stdin = sys.stdin.read() if not sys.stdin.isatty() else ""
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(path) as f:
            state = json.load(f)
        i = state["cursor"]
        out, err, code = "", "", 0
        if i >= len(state["steps"]):
            state["errors"].append(f"unexpected call after the last step: {joined!r}")
            err, code = "transcript: no step left\\n", 97
        elif re.fullmatch(state["steps"][i]["argv"], joined):
            step = state["steps"][i]
            state["cursor"] = i + 1
            out, err, code = step["stdout"], step["stderr"], step["exit"]
        else:
            wanted = state["steps"][i]["argv"]
            state["errors"].append(f"step {i}: expected {wanted!r}, got {joined!r}")
            err, code = "transcript: unexpected command\\n", 98
        state["calls"].append({"argv": argv, "stdin": stdin})
        with open(path, "w") as f:
            json.dump(state, f)
    if i < len(state["steps"]) and state["steps"][i].get("hang"):
        import time
        time.sleep(state["steps"][i]["hang"])  # a command that does not answer in time
    sys.stdout.write(out)
    sys.stderr.write(err)
    sys.exit(code)
    """
)


@dataclass
class Transcript:
    """Steps the fake queue commands replay, and the calls they received."""

    path: Path

    def _load(self) -> dict:
        return json.loads(self.path.read_text())

    def expect(
        self, argv: str, stdout: str = "", *, exit: int = 0, stderr: str = "", hang: float = 0
    ) -> None:
        """Add a step: a call whose space-joined argv fully matches the regex ``argv``.

        With ``hang``, the command answers only after that many seconds (a stuck controller).
        """
        state = self._load()
        state["steps"].append(
            {"argv": argv, "stdout": stdout, "stderr": stderr, "exit": exit, "hang": hang}
        )
        self.path.write_text(json.dumps(state))

    @property
    def calls(self) -> list[dict]:
        return self._load()["calls"]

    def assert_done(self) -> None:
        state = self._load()
        assert state["errors"] == []
        left = state["steps"][state["cursor"] :]
        assert not left, f"steps never called: {[s['argv'] for s in left]}"


@pytest.fixture
def transcript(tmp_path, monkeypatch) -> Transcript:
    """Fake queue commands first on PATH, replaying this test's transcript."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in QUEUE_COMMANDS:
        fake = bin_dir / name
        fake.write_text(f"#!{sys.executable}\n{REPLAY}")
        fake.chmod(0o755)
    path = tmp_path / "transcript.json"
    path.write_text(json.dumps({"steps": [], "cursor": 0, "calls": [], "errors": []}))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("JQMS_TRANSCRIPT", str(path))
    return Transcript(path)


def make_cluster(system: str, tmp_path: Path, **options) -> BatchCluster:
    """A cluster whose sync thread never polls by itself: the test calls sync()."""
    options = {
        "cores": 2,
        "memory": "1GiB",
        "walltime": "00:10:00",
        "python": sys.executable,
        "log_directory": str(tmp_path),
        "poll_interval": 3600,
        "config": Config(),
        **options,
    }
    if system == "lsf":
        options.setdefault("lsf_units", "MB")
    if system == "pbs":
        options.setdefault("pbs_flavor", "pro")
    return BatchCluster.for_system(system)(**options)


USER = re.escape(getpass.getuser())
SQUEUE = r"squeue --noheader --format=%i %T --states=all --jobs={}"
SGE_HEADER = (
    "job-ID  prior   name       user         state submit/start at     queue"
    "                          slots ja-task-ID \n" + "-" * 113 + "\n"
)


def sge_row(job_id: str, state: str, task: str = "") -> str:
    when = "11/22/2026 05:07:07"
    return f"{job_id:>7} 0.50000 jqms-t-1   root         {state:<5} {when} all.q@vm  1 {task}\n"


def qacct(failed: str, exit_status: int, wallclock: int) -> str:
    return (
        "==============================================================\n"
        "qname        all.q\njobnumber    7\n"
        f"failed       {failed}\nexit_status  {exit_status}\nru_wallclock {wallclock}s\n"
    )


def pbs_block(job_id: str, state: str, exit_status: int | None = None, used: str = "") -> str:
    text = f"Job Id: {job_id}\n    Job_Name = jqms-t-1\n    job_state = {state}\n"
    if used:
        text += f"    resources_used.walltime = {used}\n"
    if exit_status is not None:
        text += f"    Exit_status = {exit_status}\n"
    return text + "\n"


BJOBS = r"bjobs -noheader -o jobid stat exit_code exit_reason delimiter='\|' {}"

# Per system: the submit step, the status command for the job, its answers for each stage of the
# lifecycle, the cancel step and the steps that find out how the cancelled job ended.
LIFECYCLES = {
    "slurm": {
        "submit": (r"sbatch --parsable \S+/jqms-\w+-1\.sh", "42\n"),
        "status": SQUEUE.format(42),
        "pending": ("42 PENDING\n", 0, ""),
        "unreachable": (
            "",
            1,
            "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n",
        ),
        "running": ("42 RUNNING\n", 0, ""),
        "cancel": r"scancel 42",
        "gone": [
            (SQUEUE.format(42), "", 1, "slurm_load_jobs error: Invalid job id specified\n"),
            ("scontrol show job 42", "JobId=42 JobName=jqms-t-1\n   JobState=CANCELLED\n", 0, ""),
        ],
    },
    "sge": {
        "submit": (r"qsub \S+/jqms-\w+-1\.sh", 'Your job 7 ("jqms-t-1") has been submitted\n'),
        "status": rf"qstat -u {USER}",
        "pending": (SGE_HEADER + sge_row("7", "qw"), 0, ""),
        "unreachable": (
            "",
            1,
            "error: commlib error: got select error (Connection refused)\n"
            'error: unable to send message to qmaster using port 6444 on host "vm"\n',
        ),
        "running": (SGE_HEADER + sge_row("7", "r"), 0, ""),
        "cancel": r"qdel 7",
        "gone": [
            (rf"qstat -u {USER}", SGE_HEADER + sge_row("8", "r"), 0, ""),
            ("qacct -j 7", qacct("100 : assumedly after job", 137, 3), 0, ""),
        ],
    },
    "pbs": {
        "submit": (r"qsub \S+/jqms-\w+-1\.sh", "123.pbs01\n"),
        "status": r"qstat -f -x 123\.pbs01",
        "pending": (pbs_block("123.pbs01.example.org", "Q"), 0, ""),
        "unreachable": ("", 2, "qstat: cannot connect to server pbs01 (errno=111)\n"),
        "running": (pbs_block("123.pbs01.example.org", "R"), 0, ""),
        "cancel": r"qdel 123\.pbs01",
        "gone": [
            (
                r"qstat -f -x 123\.pbs01",
                pbs_block("123.pbs01", "F", 271, "00:00:09"),
                0,
                "",
            )
        ],
    },
    "lsf": {
        "submit": (r"bsub", "Job <55> is submitted to queue <normal>.\n"),
        "status": BJOBS.format(55),
        "pending": ("55|PEND|-|-\n", 0, ""),
        "unreachable": (
            "",
            255,
            "LSF is down. Please wait...\nbjobs: Failed in an LSF library call: "
            "Slave LIM configuration is not ready yet.\n",
        ),
        "running": ("55|RUN|-|-\n", 0, ""),
        "cancel": r"bkill 55",
        "gone": [(BJOBS.format(55), "55|EXIT|130|TERM_OWNER: job killed by owner\n", 0, "")],
    },
}


@pytest.mark.parametrize("system", sorted(LIFECYCLES))
def test_lifecycle_submit_pending_unreachable_running_cancel_gone(system, transcript, tmp_path):
    life = LIFECYCLES[system]
    cluster = make_cluster(system, tmp_path)
    try:
        expected_script = cluster.job_script()
        transcript.expect(*life["submit"])
        cluster.scale(jobs=1)
        (record,) = cluster.jobs.values()
        job_id = record.job_id
        assert job_id and record.state == JobState.PENDING
        # What was submitted is exactly what job_script() showed before.
        submitted = transcript.calls[-1]
        if cluster.submit_via_stdin:
            assert submitted["stdin"] == expected_script
        else:
            assert Path(submitted["argv"][-1]).read_text() == expected_script
        assert record.log_path and record.log_path.startswith(str(tmp_path))

        observed = []
        for stage in ("pending", "unreachable", "running"):
            stdout, code, stderr = life[stage]
            transcript.expect(life["status"], stdout, exit=code, stderr=stderr)
            cluster.sync()
            observed.append(record.state)
        assert observed == [JobState.PENDING, JobState.UNKNOWN, JobState.RUNNING]
        assert record.started_at is not None

        transcript.expect(life["cancel"])
        cluster.scale(0)
        assert record.cancel_requested
        for argv, stdout, code, stderr in life["gone"]:
            transcript.expect(argv, stdout, exit=code, stderr=stderr)
        cluster.sync()
        assert record.state == JobState.CANCELLED
    finally:
        cluster.close()  # nothing live is left: no further cancel
    transcript.assert_done()


# Per system: (steps for one poll, the state it yields). Each row is one _poll of one job.
S = JobState
STATE_TABLES = {
    "slurm": [
        ([(SQUEUE.format(42), "42 PENDING\n")], S.PENDING),
        ([(SQUEUE.format(42), "42 CONFIGURING\n")], S.PENDING),
        ([(SQUEUE.format(42), "42 SUSPENDED\n")], S.PENDING),
        ([(SQUEUE.format(42), "42 RUNNING\n")], S.RUNNING),
        ([(SQUEUE.format(42), "42 COMPLETING\n")], S.RUNNING),
        ([(SQUEUE.format(42), "42 COMPLETED\n")], S.COMPLETED),
        ([(SQUEUE.format(42), "42 TIMEOUT\n")], S.TIMEOUT),
        ([(SQUEUE.format(42), "42 CANCELLED\n")], S.CANCELLED),
        ([(SQUEUE.format(42), "42 FAILED\n")], S.FAILED),
        ([(SQUEUE.format(42), "42 OUT_OF_MEMORY\n")], S.FAILED),
        ([(SQUEUE.format(42), "42 NODE_FAIL\n")], S.FAILED),
        ([(SQUEUE.format(42), "42 SOMETHING_NEW\n")], S.UNKNOWN),
        # a job array: one state from its tasks
        ([(SQUEUE.format(42), "42_[2-3] PENDING\n42_0 RUNNING\n42_1 COMPLETED\n")], S.RUNNING),
        ([(SQUEUE.format(42), "42_[1-3] PENDING\n")], S.PENDING),
        ([(SQUEUE.format(42), "42_0 COMPLETED\n42_1 TIMEOUT\n")], S.TIMEOUT),
        ([(SQUEUE.format(42), "42_0 COMPLETED\n42_1 FAILED\n42_2 TIMEOUT\n")], S.FAILED),
        # gone from squeue: scontrol knows it until MinJobAge, then sacct (if accounting runs)
        (
            [
                (SQUEUE.format(42), "", 1, "slurm_load_jobs error: Invalid job id specified\n"),
                ("scontrol show job 42", "JobId=42\n   JobState=TIMEOUT Reason=TimeLimit\n"),
            ],
            S.TIMEOUT,
        ),
        (
            [
                (SQUEUE.format(42), ""),
                ("scontrol show job 42", "", 1, "slurm_load_jobs error: Invalid job id\n"),
                (
                    "sacct --noheader --parsable2 --allocations --format=JobID,State --jobs=42",
                    "42|CANCELLED by 1000\n",
                ),
            ],
            S.CANCELLED,
        ),
        (
            [
                (SQUEUE.format(42), ""),
                ("scontrol show job 42", "", 1, "slurm_load_jobs error: Invalid job id\n"),
                (
                    "sacct --noheader --parsable2 --allocations --format=JobID,State --jobs=42",
                    "",
                    1,
                    "Slurm accounting storage is disabled\n",
                ),
            ],
            S.UNKNOWN,  # nobody knows yet: never assumed COMPLETED
        ),
        (
            [
                (SQUEUE.format(42), ""),
                ("scontrol show job 42", "", 1, "slurm_load_jobs error: Invalid job id\n"),
                # sacct is not asked again once it said accounting is disabled
            ],
            S.UNKNOWN,
        ),
    ],
    "sge": [
        ([(rf"qstat -u {USER}", SGE_HEADER + sge_row("7", "qw"))], S.PENDING),
        ([(rf"qstat -u {USER}", SGE_HEADER + sge_row("7", "hqw"))], S.PENDING),
        ([(rf"qstat -u {USER}", SGE_HEADER + sge_row("7", "t"))], S.RUNNING),
        ([(rf"qstat -u {USER}", SGE_HEADER + sge_row("7", "r"))], S.RUNNING),
        ([(rf"qstat -u {USER}", SGE_HEADER + sge_row("7", "Rr"))], S.RUNNING),
        ([(rf"qstat -u {USER}", SGE_HEADER + sge_row("7", "s"))], S.PENDING),
        # being deleted (qdel): not finished while qstat still lists it, its workers may run
        ([(rf"qstat -u {USER}", SGE_HEADER + sge_row("7", "dr"))], S.RUNNING),
        ([(rf"qstat -u {USER}", SGE_HEADER + sge_row("7", "dt"))], S.RUNNING),
        ([(rf"qstat -u {USER}", SGE_HEADER + sge_row("7", "dRr"))], S.RUNNING),
        ([(rf"qstat -u {USER}", SGE_HEADER + sge_row("7", "ds"))], S.PENDING),
        (
            [(rf"qstat -u {USER}", SGE_HEADER + sge_row("7", "Eqw")), ("qdel 7", "")],
            S.FAILED,  # an error state never runs: cancelled at once
        ),
        (
            [
                (
                    rf"qstat -u {USER}",
                    SGE_HEADER + sge_row("7", "r", "1") + sge_row("7", "qw", "2-4:1"),
                )
            ],
            S.RUNNING,
        ),
        # gone from qstat: qacct's record (written a few seconds after the end)
        (
            [
                (rf"qstat -u {USER}", SGE_HEADER),
                ("qacct -j 7", "", 1, "error: job id 7 not found\n"),
            ],
            S.UNKNOWN,
        ),
        ([(rf"qstat -u {USER}", ""), ("qacct -j 7", qacct("0", 0, 30))], S.COMPLETED),
        ([(rf"qstat -u {USER}", ""), ("qacct -j 7", qacct("0", 1, 30))], S.FAILED),
        (
            [
                (rf"qstat -u {USER}", ""),
                (
                    "qacct -j 7",
                    qacct("37  : qmaster enforced h_rt, h_cpu, or h_vmem limit", 137, 600),
                ),
            ],
            S.TIMEOUT,
        ),
        (
            [
                (rf"qstat -u {USER}", ""),
                (
                    "qacct -j 7",
                    qacct("37  : qmaster enforced h_rt, h_cpu, or h_vmem limit", 137, 20),
                ),
            ],
            S.FAILED,  # the memory limit, not the walltime
        ),
        (
            [
                (rf"qstat -u {USER}", ""),
                ("qacct -j 7", qacct("100 : assumedly after job", 137, 20)),
            ],
            S.CANCELLED,  # qdel
        ),
        (
            [
                (rf"qstat -u {USER}", ""),
                ("qacct -j 7", qacct("26  : opening input/output file", 0, 0)),
            ],
            S.FAILED,
        ),
    ],
    "pbs": [
        ([(r"qstat -f -x 123\.pbs01", pbs_block("123.pbs01", "Q"))], S.PENDING),
        ([(r"qstat -f -x 123\.pbs01", pbs_block("123.pbs01", "H"))], S.PENDING),
        ([(r"qstat -f -x 123\.pbs01", pbs_block("123.pbs01", "R"))], S.RUNNING),
        ([(r"qstat -f -x 123\.pbs01", pbs_block("123.pbs01.example.org", "E"))], S.RUNNING),
        ([(r"qstat -f -x 123\.pbs01", pbs_block("123.pbs01", "F", 0))], S.COMPLETED),
        ([(r"qstat -f -x 123\.pbs01", pbs_block("123.pbs01", "F", 1))], S.FAILED),
        ([(r"qstat -f -x 123\.pbs01", pbs_block("123.pbs01", "F", -29))], S.TIMEOUT),
        ([(r"qstat -f -x 123\.pbs01", pbs_block("123.pbs01", "F", 271, "00:10:00"))], S.TIMEOUT),
        ([(r"qstat -f -x 123\.pbs01", pbs_block("123.pbs01", "F", 271, "00:02:00"))], S.CANCELLED),
        ([(r"qstat -f -x 123\.pbs01", pbs_block("123.pbs01", "F", -1))], S.FAILED),
        ([(r"qstat -f -x 123\.pbs01", pbs_block("123.pbs01", "F"))], S.COMPLETED),
        (
            [(r"qstat -f -x 123\.pbs01", "", 153, "qstat: Unknown Job Id 123.pbs01\n")],
            S.UNKNOWN,
        ),
    ],
    "lsf": [
        ([(BJOBS.format(55), "55|PEND|-|-\n")], S.PENDING),
        ([(BJOBS.format(55), "55|PSUSP|-|-\n")], S.PENDING),
        ([(BJOBS.format(55), "55|RUN|-|-\n")], S.RUNNING),
        ([(BJOBS.format(55), "55|DONE|-|-\n")], S.COMPLETED),
        ([(BJOBS.format(55), "55|EXIT|1|-\n")], S.FAILED),
        (
            [
                (
                    BJOBS.format(55),
                    "55|EXIT|140|TERM_RUNLIMIT: job killed after reaching LSF run time limit\n",
                )
            ],
            S.TIMEOUT,
        ),
        ([(BJOBS.format(55), "55|EXIT|140|-\n")], S.TIMEOUT),
        ([(BJOBS.format(55), "55|EXIT|130|TERM_OWNER: job killed by owner\n")], S.CANCELLED),
        (
            [
                (
                    BJOBS.format(55),
                    "55|EXIT|137|TERM_MEMLIMIT: job killed after reaching LSF memory usage limit\n",
                )
            ],
            S.FAILED,
        ),
        ([(BJOBS.format(55), "55|ZOMBI|-|-\n")], S.FAILED),
        ([(BJOBS.format(55), "55|UNKWN|-|-\n")], S.UNKNOWN),
        ([(BJOBS.format(55), "55|RUN|-|-\n55|PEND|-|-\n55|DONE|-|-\n")], S.RUNNING),
        ([(BJOBS.format(55), "", 255, "Job <55> is not found\n")], S.UNKNOWN),
    ],
}
JOB_IDS = {"slurm": "42", "sge": "7", "pbs": "123.pbs01", "lsf": "55"}


@pytest.mark.parametrize("system", sorted(STATE_TABLES))
def test_native_states_map_to_job_states(system, transcript, tmp_path):
    cluster = make_cluster(system, tmp_path)
    record = JobRecord(name="jqms-t-1", job_id=JOB_IDS[system])
    try:
        results = []
        for steps, _ in STATE_TABLES[system]:
            for argv, stdout, *rest in steps:
                code, stderr = (*rest, 0, "")[:2]
                transcript.expect(argv, stdout, exit=code, stderr=stderr)
            results.append(cluster._poll([record])[record.job_id])
        assert results == [expected for _, expected in STATE_TABLES[system]]
    finally:
        cluster.close()
    transcript.assert_done()


def test_one_status_command_asks_about_many_jobs(transcript, tmp_path):
    cluster = make_cluster("slurm", tmp_path)
    try:
        records = [JobRecord(name=f"j-{i}", job_id=str(100 + i)) for i in range(250)]
        first = ",".join(str(100 + i) for i in range(200))
        rest = ",".join(str(100 + i) for i in range(200, 250))
        transcript.expect(SQUEUE.format(first), "".join(f"{100 + i} RUNNING\n" for i in range(200)))
        transcript.expect(
            SQUEUE.format(rest), "".join(f"{100 + i} PENDING\n" for i in range(200, 250))
        )
        states = cluster._poll(records)
    finally:
        cluster.close()
    assert [states[r.job_id] for r in records] == [S.RUNNING] * 200 + [S.PENDING] * 50
    transcript.assert_done()


class FakeClock:
    """Stands in for the time module in batch/base.py, so no test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_job_lost_without_a_trace_is_unknown_then_failed_unless_its_log_tells(
    transcript, tmp_path, monkeypatch
):
    cluster = make_cluster("slurm", tmp_path)  # lost_after: 60 s
    lost = JobRecord(name="jqms-t-1", job_id="42", log_path=str(tmp_path / "jqms-t-1-42.out"))
    timed_out = JobRecord(name="jqms-t-2", job_id="43", log_path=str(tmp_path / "jqms-t-2-43.out"))
    Path(timed_out.log_path).write_text(
        "working\nslurmstepd: error: *** JOB 43 ON n1 CANCELLED AT 2026-11-22T05:30:00 "
        "DUE TO TIME LIMIT ***\n"
    )
    invalid = "slurm_load_jobs error: Invalid job id specified\n"
    clock = FakeClock()
    monkeypatch.setattr("jobqueue_ms.batch.base.time", clock)
    try:
        transcript.expect(SQUEUE.format("42,43"), exit=1, stderr=invalid)
        transcript.expect("scontrol show job 42", exit=1, stderr=invalid)
        transcript.expect("sacct .*", exit=1, stderr="Slurm accounting storage is disabled\n")
        transcript.expect("scontrol show job 43", exit=1, stderr=invalid)  # sacct: not again
        assert cluster._poll([lost, timed_out]) == {"42": S.UNKNOWN, "43": S.TIMEOUT}
        clock.now += 61
        transcript.expect(SQUEUE.format("42,43"), exit=1, stderr=invalid)
        transcript.expect("scontrol show job 42", exit=1, stderr=invalid)
        transcript.expect("scontrol show job 43", exit=1, stderr=invalid)
        assert cluster._poll([lost, timed_out]) == {"42": S.FAILED, "43": S.TIMEOUT}
        assert "left the queue and no command knows how it ended" in lost.info["lost"]
    finally:
        cluster.close()
    transcript.assert_done()


def test_a_failed_submission_raises_with_argv_exit_code_and_stderr(transcript, tmp_path):
    cluster = make_cluster("slurm", tmp_path)
    try:
        transcript.expect(
            r"sbatch --parsable \S+",
            exit=1,
            stderr="sbatch: error: Batch job submission failed: Invalid account or "
            "account/partition combination specified\n",
        )
        with pytest.raises(CommandError) as info:
            cluster.scale(jobs=1)
        message = str(info.value)
        assert "`sbatch --parsable " in message and "exited with code 1" in message
        assert "Invalid account" in message
        assert info.value.returncode == 1 and info.value.argv[0] == "sbatch"
        (record,) = cluster.jobs.values()
        assert record.state == S.FAILED and "Invalid account" in record.error
    finally:
        cluster.close()
    transcript.assert_done()


def test_a_submission_without_an_id_cancels_the_job_by_name(transcript, tmp_path):
    cluster = make_cluster("slurm", tmp_path)
    try:
        transcript.expect(r"sbatch --parsable \S+", "sbatch: queued, somehow\n")
        transcript.expect(r"scancel --name jqms-\w+-1")
        with pytest.raises(CommandError, match="no job id in the output of sbatch"):
            cluster.scale(jobs=1)
    finally:
        cluster.close()
    transcript.assert_done()


@pytest.mark.parametrize(
    ("system", "submit", "cancel"),
    [
        ("slurm", r"sbatch --parsable \S+", r"scancel --name jqms-\w+-1"),
        ("sge", r"qsub \S+", r"qdel jqms-\w+-1"),
        ("lsf", r"bsub", r"bkill -J jqms-\w+-1"),
    ],
)
def test_a_submission_that_times_out_cancels_the_job_by_name(
    system, submit, cancel, transcript, tmp_path
):
    """The queue may have taken the job before the submit command hung: never orphan it."""
    cluster = make_cluster(system, tmp_path, command_timeout=0.5)
    try:
        transcript.expect(submit, hang=30)
        transcript.expect(cancel)
        with pytest.raises(CommandError, match="did not finish within 0.5 s"):
            cluster.scale(jobs=1)
        (record,) = cluster.jobs.values()
        assert record.state == S.FAILED and not record.job_id
    finally:
        cluster.close()
    transcript.assert_done()


def test_close_cancels_every_job_it_submitted_and_only_those(transcript, tmp_path):
    cluster = make_cluster("sge", tmp_path, pe="smp")
    try:
        for job_id in ("7", "8"):
            transcript.expect(r"qsub \S+", f'Your job {job_id} ("x") has been submitted\n')
        cluster.scale(jobs=2)
        transcript.expect(r"qdel 7 8")
    finally:
        cluster.close()
    transcript.assert_done()


def test_scheduler_job_placement(transcript, tmp_path, monkeypatch):
    """The schedulers run in their own job; the cluster reads their files, close cancels it."""
    from jobqueue_ms.runtime.scheduler import Scheduler

    # a known cluster id, so the scheduler files can be written where the cluster will look:
    # under its unique name (job_name plus the id), never another same-named cluster's
    fixed = uuid.UUID("0123abcd" + "0" * 24)
    monkeypatch.setattr(cluster_module, "uuid", SimpleNamespace(uuid4=lambda: fixed))
    shared = tmp_path / "shared"
    files = [shared / "jqmstest-0123abcd" / f"sched-{i}.json" for i in range(2)]
    files[0].parent.mkdir(parents=True)
    schedulers = [Scheduler(host="127.0.0.1", port=0, scheduler_file=str(f)) for f in files]
    addresses = [s.start() for s in schedulers]
    try:
        transcript.expect(r"sbatch --parsable \S+/jqmstest-0123abcd-scheduler\.sh", "77\n")
        cluster = make_cluster(
            "slurm",
            tmp_path,
            job_name="jqmstest",
            scheduler_placement="job",
            n_schedulers=2,
            shared_directory=str(shared),
            scheduler_options={"walltime": "12:00:00", "memory": "2GiB"},
        )
        try:
            assert cluster.scheduler_addresses == addresses
            scheduler_script = Path(transcript.calls[0]["argv"][-1]).read_text()
            for f in files:
                assert f"--scheduler-file {f} " in scheduler_script
            assert "#SBATCH --time=12:00:00\n" in scheduler_script
            assert "#SBATCH --cpus-per-task=2\n" in scheduler_script
            for address in addresses:
                assert f"--scheduler {address}\n" in cluster.job_script()
            transcript.expect("scancel 77")
        finally:
            cluster.close()
        assert not files[0].parent.exists()  # the scheduler files are removed
    finally:
        for s in schedulers:
            s.stop()
    transcript.assert_done()


def test_two_clusters_with_one_job_name_never_share_job_names(transcript, tmp_path):
    """Cancel-by-name, scheduler files and key files go by the unique name, never job_name."""
    a = make_cluster("slurm", tmp_path, job_name="analysis")
    b = make_cluster("slurm", tmp_path, job_name="analysis")
    try:
        assert a.name == b.name == "analysis"
        assert a.unique_name == f"analysis-{a.cluster_id}" != b.unique_name
        assert f"#SBATCH --job-name={a.unique_name}-1\n" in a.job_script()
        assert f"#SBATCH --job-name={b.unique_name}-1\n" in b.job_script()
        assert a.security.path != b.security.path
    finally:
        a.close()
        b.close()
    transcript.assert_done()


def test_a_scheduler_job_that_ends_early_fails_with_its_log(transcript, tmp_path, monkeypatch):
    fixed = uuid.UUID("4567cdef" + "0" * 24)  # a known cluster id: the log's name has it
    monkeypatch.setattr(cluster_module, "uuid", SimpleNamespace(uuid4=lambda: fixed))
    transcript.expect(r"sbatch --parsable \S+/jqmsbad-4567cdef-scheduler\.sh", "78\n")
    transcript.expect(SQUEUE.format(78), "78 FAILED\n")
    log = tmp_path / "jqmsbad-4567cdef-scheduler-78.out"
    log.write_text("python: No module named jobqueue_ms\n")
    with pytest.raises(ClusterError, match="(?s)ended \\(FAILED\\).*No module named jobqueue_ms"):
        make_cluster(
            "slurm",
            tmp_path,
            job_name="jqmsbad",
            scheduler_placement="job",
            shared_directory=str(tmp_path / "shared"),
        )
    transcript.assert_done()


# ---------------------------------------------------------------------------- run_command itself


def test_run_command_returns_output_and_passes_stdin():
    result = run_command(
        [sys.executable, "-c", "import sys; print(sys.stdin.read().upper())"],
        stdin="abc",
        timeout=30,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "ABC\n", "")


def test_run_command_raises_with_argv_exit_code_stdout_and_stderr():
    code = "import sys; print('partial'); print('bad thing', file=sys.stderr); sys.exit(3)"
    with pytest.raises(CommandError) as info:
        run_command([sys.executable, "-c", code], timeout=30)
    error = info.value
    assert (error.returncode, error.stdout, error.stderr) == (3, "partial\n", "bad thing\n")
    assert error.argv == (sys.executable, "-c", code)
    assert "exited with code 3" in str(error) and "stderr: bad thing" in str(error)


def test_run_command_names_a_missing_command_and_a_timeout():
    with pytest.raises(CommandError, match="'no-such-sbatch' is not on PATH") as info:
        run_command(["no-such-sbatch"], timeout=30)
    assert info.value.returncode == 127
    with pytest.raises(CommandError, match="did not finish within 0.2 s") as info:
        run_command([sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.2)
    assert info.value.returncode is None


def test_the_fake_commands_are_the_ones_run(transcript):
    transcript.expect("squeue --version", "slurm 99\n")
    assert subprocess.run(["squeue", "--version"], capture_output=True, text=True).stdout == (
        "slurm 99\n"
    )
    transcript.assert_done()


@pytest.mark.parametrize(
    ("flavor", "log_name"),
    [("torque", "{name}.out-0"), ("pro", "{name}.0.out")],
)
def test_a_pbs_array_that_fails_at_start_reports_its_first_task_s_log(
    flavor, log_name, transcript, tmp_path
):
    """Torque appends -<index> to the -o path of each task; PBS Pro fills ^array_index^."""
    cluster = make_cluster("pbs", tmp_path, pbs_flavor=flavor, job_array=2, cores=1)
    try:
        transcript.expect(r"qsub \S+/jqms-\w+-1\.sh", "123[].pbs01\n")
        cluster.scale(jobs=1)
        (record,) = cluster.jobs.values()
        assert record.log_path == str(tmp_path / log_name.format(name=record.name))
        Path(record.log_path).write_text("module: command not found\n")
        ended = pbs_block("123[0].pbs01", "C" if flavor == "torque" else "F", 1)
        ended += pbs_block("123[1].pbs01", "C" if flavor == "torque" else "F", 1)
        x = "" if flavor == "torque" else " -x"
        transcript.expect(rf"qstat -f{x} -t 123\[\]\.pbs01", ended)
        transcript.expect(r"qsub \S+/jqms-\w+-2\.sh", "124[].pbs01\n")  # its replacement
        cluster.sync()
        assert record.state == JobState.FAILED
        assert record.error.endswith("end of its log:\nmodule: command not found")
        transcript.expect(r"qdel 124\[\]\.pbs01")
    finally:
        cluster.close()
    transcript.assert_done()


def test_an_sge_job_being_deleted_stays_live_until_it_leaves_qstat(transcript, tmp_path):
    cluster = make_cluster("sge", tmp_path, pe="smp")
    try:
        transcript.expect(r"qsub \S+", 'Your job 7 ("x") has been submitted\n')
        cluster.scale(jobs=1)
        (record,) = cluster.jobs.values()
        transcript.expect(rf"qstat -u {USER}", SGE_HEADER + sge_row("7", "r"))
        cluster.sync()
        transcript.expect("qdel 7")
        cluster.scale(0)
        transcript.expect(rf"qstat -u {USER}", SGE_HEADER + sge_row("7", "dr"))
        cluster.sync()
        assert record.state == JobState.RUNNING and record.ended_at is None  # still going
        transcript.expect(rf"qstat -u {USER}", SGE_HEADER)
        transcript.expect("qacct -j 7", qacct("100 : assumedly after job", 137, 3))
        cluster.sync()
        assert record.state == JobState.CANCELLED and record.ended_at is not None
    finally:
        cluster.close()
    transcript.assert_done()


@pytest.mark.parametrize(("stagger", "stagger_s"), [(None, 300.0), ("10m", 600.0), (2, 120.0)])
def test_jobs_started_together_drain_at_staggered_times(stagger, stagger_s, transcript, tmp_path):
    """Each job's drain comes up to lifetime_stagger before its workers' lifetime ends."""
    options = {} if stagger is None else {"lifetime_stagger": stagger}
    cluster = make_cluster("slurm", tmp_path, walltime="02:00:00", **options)
    try:
        for job_id in (42, 43, 44):
            transcript.expect(r"sbatch --parsable \S+", f"{job_id}\n")
        cluster.scale(jobs=3)
        transcript.expect(SQUEUE.format("42,43,44"), "42 RUNNING\n43 RUNNING\n44 RUNNING\n")
        cluster.sync()
        records = sorted(cluster.jobs.values(), key=lambda r: r.name)
        lifetime = 7200 - 300  # the workers retire 5 minutes before the walltime
        ends = {j.name: j.walltime_end for j in cluster.snapshot().jobs}
        offsets = [r.started_at + lifetime - ends[r.name] for r in records]
        assert all(0 <= offset < stagger_s for offset in offsets), offsets
        assert min(abs(a - b) for a, b in itertools.combinations(offsets, 2)) > stagger_s / 10
        transcript.expect("scancel 42 43 44")
    finally:
        cluster.close()
    transcript.assert_done()


def test_lifetime_stagger_must_be_shorter_than_the_lifetime(tmp_path):
    with pytest.raises(ValueError, match="lifetime_stagger='2h' must be shorter than the work"):
        make_cluster("slurm", tmp_path, walltime="01:00:00", lifetime_stagger="2h")


# Per system: cluster options for an array of 3 tasks, the array's id, and (status steps, state).
ARRAY_TABLES = {
    "slurm": (
        {},
        "123",
        [
            ([(SQUEUE.format(123), "123_[5-9] PENDING\n")], S.PENDING),
            ([(SQUEUE.format(123), "123_4 RUNNING\n123_[5-9] PENDING\n")], S.RUNNING),
            ([(SQUEUE.format(123), "123_0 COMPLETED\n123_1 COMPLETED\n")], S.COMPLETED),
            ([(SQUEUE.format(123), "123_0 COMPLETED\n123_1 OUT_OF_MEMORY\n")], S.FAILED),
        ],
    ),
    "sge": (
        {"pe": "smp"},
        "7",
        [
            # one row per running task, one row for the tasks still waiting (a range)
            ([(rf"qstat -u {USER}", SGE_HEADER + sge_row("7", "qw", "1-3:1"))], S.PENDING),
            (
                [
                    (
                        rf"qstat -u {USER}",
                        SGE_HEADER + sge_row("7", "r", "1") + sge_row("7", "qw", "2-3:1"),
                    )
                ],
                S.RUNNING,
            ),
            (
                [
                    (
                        rf"qstat -u {USER}",
                        SGE_HEADER + sge_row("7", "r", "2") + sge_row("7", "Eqw", "3"),
                    ),
                    ("qdel 7", ""),
                ],
                S.RUNNING,  # a task in an error state never runs: the array is cancelled (qdel 7)
            ),
            # every task left qstat: qacct has one record per task
            (
                [(rf"qstat -u {USER}", SGE_HEADER), ("qacct -j 7", qacct("0", 0, 30) * 3)],
                S.COMPLETED,
            ),
            (
                [
                    (rf"qstat -u {USER}", SGE_HEADER),
                    ("qacct -j 7", qacct("0", 0, 30) + qacct("0", 2, 30)),
                ],
                S.FAILED,
            ),
        ],
    ),
    "pbs": (
        {"pbs_flavor": "pro"},
        "123[].pbs01",
        [
            # qstat -t: the array (B while any subjob runs) and its subjobs 123[i]
            (
                [
                    (
                        r"qstat -f -x -t 123\[\]\.pbs01",
                        pbs_block("123[].pbs01", "B")
                        + pbs_block("123[0].pbs01", "R")
                        + pbs_block("123[1].pbs01", "Q")
                        + pbs_block("123[2].pbs01", "X", 0),
                    )
                ],
                S.RUNNING,
            ),
            (
                [
                    (
                        r"qstat -f -x -t 123\[\]\.pbs01",
                        pbs_block("123[].pbs01.example.org", "Q")
                        + pbs_block("123[0].pbs01.example.org", "Q"),
                    )
                ],
                S.PENDING,
            ),
            (
                [
                    (
                        r"qstat -f -x -t 123\[\]\.pbs01",
                        pbs_block("123[].pbs01", "F")
                        + pbs_block("123[0].pbs01", "X", 0)
                        + pbs_block("123[1].pbs01", "X", 0),
                    )
                ],
                S.COMPLETED,
            ),
            (
                [
                    (
                        r"qstat -f -x -t 123\[\]\.pbs01",
                        pbs_block("123[].pbs01", "F")
                        + pbs_block("123[0].pbs01", "X", 0)
                        + pbs_block("123[1].pbs01", "X", 2),
                    )
                ],
                S.FAILED,
            ),
        ],
    ),
    "pbs-torque": (
        {"pbs_flavor": "torque"},
        "123[].srv",
        [
            (
                [
                    (
                        r"qstat -f -t 123\[\]\.srv",
                        pbs_block("123[0].srv.example.org", "R")
                        + pbs_block("123[1].srv.example.org", "C", 0),
                    )
                ],
                S.RUNNING,
            ),
            (
                [
                    (
                        r"qstat -f -t 123\[\]\.srv",
                        pbs_block("123[0].srv", "C", 0) + pbs_block("123[1].srv", "C", 0),
                    )
                ],
                S.COMPLETED,
            ),
        ],
    ),
    "lsf": (
        {},
        "55",
        [
            ([(BJOBS.format(55), "55|PEND|-|-\n55|PEND|-|-\n55|PEND|-|-\n")], S.PENDING),
            ([(BJOBS.format(55), "55|DONE|-|-\n55|RUN|-|-\n55|PEND|-|-\n")], S.RUNNING),
            ([(BJOBS.format(55), "55|DONE|-|-\n55|EXIT|1|-\n55|DONE|-|-\n")], S.FAILED),
        ],
    ),
}


@pytest.mark.parametrize("name", sorted(ARRAY_TABLES))
def test_job_array_states_combine_their_tasks(name, transcript, tmp_path):
    """One state per array from its tasks: running if any runs, then pending, then how it ended."""
    options, job_id, table = ARRAY_TABLES[name]
    cluster = make_cluster(name.split("-")[0], tmp_path, job_array=3, cores=1, **options)
    record = JobRecord(name="jqms-t-1", job_id=job_id)
    try:
        results = []
        for steps, _ in table:
            for argv, stdout, *rest in steps:
                code, stderr = (*rest, 0, "")[:2]
                transcript.expect(argv, stdout, exit=code, stderr=stderr)
            results.append(cluster._poll([record])[job_id])
        assert results == [expected for _, expected in table]
    finally:
        cluster.close()
    transcript.assert_done()
