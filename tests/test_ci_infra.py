"""The test infrastructure itself: real SLURM and SGE, the PBS shim and the LSF stand-in do what the
backend tests rely on. Each test polls with a deadline and removes the jobs it submitted."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest
from helpers import CI, is_root, run

# ---------------------------------------------------------------------------------------- SLURM


def squeue_ids() -> set[str]:
    return set(run(["squeue", "--noheader", "--format=%i"]).stdout.split())


def test_slurm_two_node_job_spans_two_nodes(slurm, tmp_path, wait_until):
    script = tmp_path / "two-nodes.sh"
    script.write_text(
        textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH -J two-nodes
        #SBATCH -N 2
        #SBATCH --ntasks-per-node=1
        #SBATCH --mem=1G
        #SBATCH -t 00:02:00
        #SBATCH -o {tmp_path}/%x-%j.out
        echo "NODELIST=$SLURM_JOB_NODELIST"
        srun bash -c 'echo "NODE=$SLURMD_NODENAME"'
        """)
    )
    job_id = run(["sbatch", "--parsable", script]).stdout.strip()
    assert job_id.isdigit()
    try:
        wait_until(lambda: job_id not in squeue_ids(), timeout=60, message=f"job {job_id} to end")
    finally:
        run(["scancel", job_id], check=False)
    out = (tmp_path / f"two-nodes-{job_id}.out").read_text()
    nodelist = re.search(r"^NODELIST=(\S+)$", out, re.M).group(1)
    hosts = run(["scontrol", "show", "hostnames", nodelist]).stdout.split()
    assert len(hosts) == 2 and set(hosts) <= set(slurm.nodes)
    assert sorted(re.findall(r"^NODE=(\S+)$", out, re.M)) == sorted(hosts)


def test_slurm_memory_requests_and_no_sacct(slurm, wait_until):
    job_id = run(["sbatch", "--parsable", "-o", "/dev/null", "--mem=1G", "--wrap", "true"]).stdout
    job_id = job_id.strip()
    wait_until(lambda: job_id not in squeue_ids(), timeout=60, message=f"job {job_id} to end")
    too_big = run(
        ["sbatch", "-o", "/dev/null", f"--mem={slurm.memory_mb_per_node + 1}M", "--wrap", "true"],
        check=False,
    )
    assert too_big.returncode == 1
    assert "Memory specification can not be satisfied" in too_big.stderr
    # No slurmdbd: backends must not rely on sacct (missing from squeue means finished).
    sacct = run(["sacct", "-j", job_id], check=False)
    assert sacct.returncode != 0 and "accounting storage is disabled" in sacct.stderr


@pytest.mark.skipif(not is_root(), reason="only root runs the start scripts")
@pytest.mark.parametrize("system", ["slurm", "sge"])
def test_start_is_idempotent_when_running(system, request):
    request.getfixturevalue(system)
    proc = run([CI / system / "start"], timeout=30)
    assert "already running and ready" in proc.stderr


# ---------------------------------------------------------------------------------------- SGE


def test_sge_parallel_environment_smp_gives_two_slots(sge, tmp_path, wait_until):
    script = tmp_path / "smp.sh"
    script.write_text(
        textwrap.dedent(f"""\
        #!/bin/bash
        #$ -N smp2
        #$ -pe smp 2
        #$ -cwd
        #$ -j y
        #$ -o {tmp_path}/smp.out
        echo "NSLOTS=$NSLOTS"
        """)
    )
    job_id = run(["qsub", "-terse", script], cwd=tmp_path).stdout.strip()
    assert job_id.isdigit()  # an empty id would make `qstat -j ""` succeed forever

    def finished() -> bool:
        return run(["qstat", "-j", job_id], check=False).returncode != 0

    try:
        wait_until(finished, timeout=60, message=f"SGE job {job_id} to end")
    finally:
        run(["qdel", job_id], check=False)
    assert "NSLOTS=2" in (tmp_path / "smp.out").read_text()


# ---------------------------------------------------------------------------------------- sshd


def test_sshd_fixture_logs_in_on_both_hosts(sshd):
    for host in sshd.hosts:
        argv = ["ssh", "-p", sshd.port, "-o", "BatchMode=yes", "-i", sshd.key, host]
        out = run([*argv, "echo $SSH_CONNECTION"], timeout=30).stdout.split()
        assert out[2:] == [host, str(sshd.port)]


# ---------------------------------------------------------------------------------------- PBS shim


def qstat_state(job_id: str) -> str:
    out = run(["qstat", "-f", job_id]).stdout
    return re.search(r"job_state = (\w)", out).group(1)


def test_pbs_shim_qsub_qstat_qdel_round_trip(pbs_shim, tmp_path, wait_until):
    quick = tmp_path / "quick.sh"
    quick.write_text("#!/bin/bash\n#PBS -N quick\n#PBS -l walltime=00:02:00\necho PBS-OK\n")
    # The shim overrides #PBS -o/-e with its own defaults: pass them on the command line.
    job_id = run(["qsub", "-o", tmp_path / "quick.out", "-e", tmp_path / "quick.err", quick]).stdout
    job_id = job_id.strip()
    assert job_id.isdigit()  # a bare SLURM id, not PBS's N.server
    wait_until(lambda: qstat_state(job_id) == "C", timeout=60, message=f"PBS job {job_id} to end")
    assert (tmp_path / "quick.out").read_text() == "PBS-OK\n"

    slow = tmp_path / "slow.sh"
    slow.write_text("#!/bin/bash\n#PBS -N slow\nsleep 300\n")
    job_id = run(["qsub", "-o", tmp_path / "slow.out", "-e", tmp_path / "slow.err", slow]).stdout
    job_id = job_id.strip()
    try:
        assert qstat_state(job_id) in ("Q", "R")
        assert re.search(rf"^{job_id}\s+slow\s", run(["qstat", job_id]).stdout, re.M)
    finally:
        run(["qdel", job_id])
    wait_until(lambda: qstat_state(job_id) == "C", timeout=30, message=f"PBS job {job_id} gone")
    wait_until(lambda: job_id not in squeue_ids(), timeout=30, message=f"job {job_id} to leave")


# ---------------------------------------------------------------------------------------- LSF


def bjobs_field(job_id: str, field: str = "stat") -> str:
    return run(["bjobs", "-noheader", "-o", f"{field}", job_id]).stdout.strip()


def bsub(script: str, cwd: Path) -> str:
    out = run(["bsub"], input=script, cwd=cwd).stdout
    m = re.fullmatch(r"Job <(\d+)> is submitted to default queue <normal>\.\n", out)
    assert m, out
    return m.group(1)


def test_lsf_bsub_reads_the_script_on_stdin(lsf_standin, tmp_path, wait_until):
    job_id = bsub(
        textwrap.dedent("""\
        #!/bin/bash
        #BSUB -J stdin-job
        #BSUB -n 2
        #BSUB -R "span[hosts=1]"
        #BSUB -M 1024
        #BSUB -W 00:05
        #BSUB -o out-%J.txt
        echo "JOB=$LSB_JOBID INDEX=$LSB_JOBINDEX"
        echo "NPROC=$LSB_MAX_NUM_PROCESSORS NUM=$LSB_DJOB_NUMPROC"
        echo "HOSTS=$LSB_HOSTS"
        """),
        tmp_path,
    )
    wait_until(lambda: bjobs_field(job_id) == "DONE", timeout=30, message=f"LSF job {job_id} DONE")
    out = (tmp_path / f"out-{job_id}.txt").read_text()
    assert f"JOB={job_id} INDEX=0\nNPROC=2 NUM=2\n" in out
    assert len(re.search(r"^HOSTS=(.*)$", out, re.M).group(1).split()) == 2
    assert bjobs_field(job_id, "job_name") == "stdin-job"


def test_lsf_bsub_refuses_an_unknown_directive(lsf_standin, tmp_path):
    proc = run(["bsub"], input="#!/bin/sh\n#BSUB -J x\n#BSUB --made-up 3\ntrue\n", check=False)
    assert proc.returncode == 255
    assert "illegal option" in proc.stderr and "Job not submitted" in proc.stderr
    assert run(["bjobs", "-a"], check=False).stderr == "No job found\n"


def test_lsf_bjobs_pend_run_done(lsf_standin, tmp_path, monkeypatch, wait_until):
    monkeypatch.setenv("JQMS_LSF_SLOTS", "1")
    go = tmp_path / "go"
    first = bsub(f"while [ ! -e {go} ]; do sleep 0.05; done\n", tmp_path)
    second = bsub("true\n", tmp_path)
    wait_until(lambda: bjobs_field(first) == "RUN", timeout=10, message="first job RUN")
    assert bjobs_field(second) == "PEND"  # one slot, taken by the first job
    go.touch()
    wait_until(lambda: bjobs_field(first) == "DONE", timeout=10, message="first job DONE")
    wait_until(lambda: bjobs_field(second) == "DONE", timeout=10, message="second job DONE")
    table = run(["bjobs", "-noheader", "-o", "jobid stat exit_code", first, second]).stdout
    assert table.splitlines() == [f"{first} DONE 0", f"{second} DONE 0"]


def test_lsf_bkill_kills_the_process_group(lsf_standin, tmp_path, wait_until):
    pidfile = tmp_path / "pid"
    job_id = bsub(
        f"sleep 300 & echo $! > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; wait\n", tmp_path
    )
    wait_until(pidfile.exists, timeout=10, message="the job to start")
    child = int(pidfile.read_text())
    out = run(["bkill", job_id]).stdout
    assert out == f"Job <{job_id}> is being terminated\n"
    wait_until(lambda: bjobs_field(job_id) == "EXIT", timeout=15, message=f"job {job_id} EXIT")
    assert bjobs_field(job_id, "exit_reason").startswith("TERM_OWNER")
    wait_until(lambda: not pid_alive(child), timeout=10, message=f"the job's sleep {child} gone")
    again = run(["bkill", job_id], check=False)
    assert again.returncode == 255 and "Job has already finished" in again.stderr


def test_lsf_walltime_is_enforced(lsf_standin, tmp_path, monkeypatch, wait_until):
    monkeypatch.setenv("JQMS_LSF_SECONDS_PER_MINUTE", "1")  # -W 1 means one second here
    job_id = bsub("#BSUB -W 1\nsleep 300\n", tmp_path)
    wait_until(lambda: bjobs_field(job_id) == "EXIT", timeout=15, message=f"job {job_id} EXIT")
    assert bjobs_field(job_id, "exit_reason").startswith("TERM_RUNLIMIT")


def test_lsf_bjobs_unknown_job(lsf_standin):
    proc = run(["bjobs", "-noheader", "-o", "jobid stat", "4242"], check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (255, "", "Job <4242> is not found\n")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # nothing reaps orphans on some CI machines
