"""Job ids from what each submit command really prints, error cases included."""

from __future__ import annotations

import re

import pytest

from jobqueue_ms.batch.base import BatchCluster
from jobqueue_ms.batch.lsf import LSFCluster
from jobqueue_ms.batch.pbs import PBSCluster
from jobqueue_ms.batch.sge import SGECluster
from jobqueue_ms.batch.slurm import SLURMCluster
from jobqueue_ms.deploy.cluster import JobState

SUBMIT_OUTPUTS = [
    # SLURM: sbatch, sbatch --parsable (one cluster, or federated with the cluster name)
    (SLURMCluster, "Submitted batch job 123\n", "123"),
    (SLURMCluster, "123\n", "123"),
    (SLURMCluster, "123;cluster\n", "123"),
    (SLURMCluster, "sbatch: warning: can't honor --ntasks-per-node\n4567\n", "4567"),
    # SGE: qsub, a job array, qsub -terse
    (SGECluster, 'Your job 12 ("jqms-1") has been submitted\n', "12"),
    (SGECluster, 'Your job-array 12.1-4:1 ("jqms-1") has been submitted\n', "12"),
    (SGECluster, "12\n", "12"),
    (SGECluster, "12.1-4:1\n", "12"),
    # PBS Pro / OpenPBS, Torque, arrays of both, and slurm-wlm-torque's qsub (a bare id)
    (PBSCluster, "123.pbsserver\n", "123.pbsserver"),
    (PBSCluster, "123.host.example.org\n", "123.host.example.org"),
    (PBSCluster, "123[].pbsserver\n", "123[].pbsserver"),
    (PBSCluster, "9\n", "9"),
    # LSF: to a named queue, to the default queue
    (LSFCluster, "Job <123> is submitted to queue <normal>.\n", "123"),
    (LSFCluster, "Job <123> is submitted to default queue <normal>.\n", "123"),
]


@pytest.mark.parametrize(
    ("cls", "stdout", "job_id"),
    SUBMIT_OUTPUTS,
    ids=[f"{c.system}:{s.strip()[:30]}" for c, s, _ in SUBMIT_OUTPUTS],
)
def test_job_id_from_submit_output(cls, stdout, job_id):
    assert cls.parse_job_id(stdout) == job_id


NO_ID = [
    (SLURMCluster, ""),
    (SLURMCluster, "sbatch: error: Batch job submission failed: Invalid account\n"),
    (SLURMCluster, "Submitted batch job\n"),
    (SGECluster, 'Unable to run job: denied: host "x" is no submit host.\nExiting.\n'),
    (SGECluster, "Your job has been submitted\n"),
    (PBSCluster, "qsub: Unknown queue\n"),
    (PBSCluster, ""),
    (LSFCluster, "normal: No such queue. Job not submitted.\n"),
    (LSFCluster, "Job not submitted.\n"),
]


@pytest.mark.parametrize(("cls", "stdout"), NO_ID, ids=[f"{c.system}:{s[:25]}" for c, s in NO_ID])
def test_output_without_an_id_is_an_error_naming_the_output(cls, stdout):
    with pytest.raises(ValueError, match=re.escape(repr(stdout.strip()))):
        cls.parse_job_id(stdout)


def test_a_half_written_backend_fails_when_it_is_defined():
    with pytest.raises(TypeError, match="must declare status_cmd"):

        class Half(BatchCluster):  # noqa: F841 - defining it is the test
            system = "half"
            template = "slurm.sh.j2"
            directive_prefix = "#X"
            submit_cmd = ("xsub",)
            cancel_cmd = ("xdel",)
            job_id_pattern = r"(?P<job_id>\d+)"
            states = {"R": JobState.RUNNING}
            log_name = array_log_name = "{name}.out"

    with pytest.raises(TypeError, match=r"needs a \(\?P<job_id>...\) group"):

        class NoGroup(BatchCluster):  # noqa: F841
            system = "nogroup"
            template = "slurm.sh.j2"
            directive_prefix = "#X"
            submit_cmd = ("xsub",)
            status_cmd = ("xstat",)
            cancel_cmd = ("xdel",)
            job_id_pattern = r"(\d+)"
            states = {"R": JobState.RUNNING}
            log_name = array_log_name = "{name}.out"

    with pytest.raises(TypeError, match="not a JobState"):

        class BadState(BatchCluster):  # noqa: F841
            system = "badstate"
            template = "slurm.sh.j2"
            directive_prefix = "#X"
            submit_cmd = ("xsub",)
            status_cmd = ("xstat",)
            cancel_cmd = ("xdel",)
            job_id_pattern = r"(?P<job_id>\d+)"
            states = {"R": "RUNNING"}
            log_name = array_log_name = "{name}.out"
