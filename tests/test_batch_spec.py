"""JobSpec: bad options are refused before anything is submitted, naming what is wrong."""

from __future__ import annotations

import os
import re
from datetime import timedelta

import pytest

from jobqueue_ms.batch.base import BatchCluster
from jobqueue_ms.batch.spec import JobSpec
from jobqueue_ms.config import Config

EMPTY = Config()


def spec(system: str = "slurm", **options):
    options.setdefault("cores", 8)
    options.setdefault("memory", "16GiB")
    return BatchCluster.for_system(system).make_spec(config=EMPTY, **options)


def test_derived_numbers():
    s = spec(cores=8, memory="16GiB", processes=4, walltime="01:00:00")
    assert (s.threads, s.worker_memory_bytes, s.memory_per_core_bytes) == (2, 4 * 2**30, 2**31)
    assert s.walltime == timedelta(hours=1)
    assert (s.walltime_s, s.worker_lifetime_s) == (3600, 3300)  # retire 5 minutes early
    assert spec(walltime="00:05:00").worker_lifetime_s == 270  # at most a tenth early
    assert spec().worker_lifetime_s is None
    assert spec(processes=2, nodes=3, job_array=4).workers_per_job == 24


def test_log_directory_is_expanded_here():
    assert spec(log_directory="~/logs").log_directory == os.path.expanduser("~/logs")


def test_walltime_forms():
    expected = timedelta(hours=1, minutes=30)
    for form in ("01:30:00", "90", 90, "90m", "1.5h", "0-01:30:00", expected):
        assert spec(walltime=form).walltime == expected, form


def test_account_and_project_are_one_setting():
    assert spec(project="p1").account == "p1"
    assert spec(account="p1", project="p1").account == "p1"
    with pytest.raises(ValueError, match="account='a' and project='b' name the same setting"):
        spec(account="a", project="b")


def test_resources_forms():
    expected = (("GPU", 1.0), ("MEM", 2.5))
    assert spec(resources={"GPU": 1, "MEM": 2.5}).resources == expected
    assert spec(resources=["GPU=1", "MEM=2.5"]).resources == expected
    assert spec(resources="GPU=1,MEM=2.5").resources == expected
    assert spec(resources={"GPU": 1}).resource_pairs == ["GPU=1"]


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"memory": "lots"}, ValueError, "memory='lots' is not a memory size; use .*16GB"),
        ({"memory": -1}, ValueError, "memory=-1 must be positive"),
        ({"memory": None}, ValueError, "needs memory=...; e.g. SLURMCluster\\(cores=8"),
        ({"cores": 0}, ValueError, "cores=0 must be at least 1"),
        ({"cores": 2.5}, ValueError, "cores=2.5 is not a whole number"),
        ({"cores": True}, ValueError, "cores=True is not a whole number"),
        ({"cores": "eight"}, ValueError, "cores='eight' is not a whole number"),
        ({"walltime": "soon"}, ValueError, "walltime='soon' is not a duration; use HH:MM:SS"),
        ({"walltime": "00:00:00"}, ValueError, "walltime='00:00:00' must be positive"),
        ({"walltime": [1]}, ValueError, r"walltime=\[1\] is not a duration"),
        (
            {"memroy": "1GB"},
            TypeError,
            r"unknown option 'memroy' \(did you mean 'memory'\?\)\. Accepted",
        ),
        ({"pbs_flavor": "pro"}, TypeError, "SLURMCluster\\(\\) got an unknown option 'pbs_flavor'"),
        ({"processes": 3}, ValueError, "cores=8 is not a multiple of processes=3.*processes=2"),
        ({"processes": 16}, ValueError, "processes=16 is more than cores=8"),
        ({"queue": "a b"}, ValueError, "queue='a b' is not a single word"),
        ({"account": "x;rm"}, ValueError, "account='x;rm' is not a single word"),
        ({"job_name": "1abc"}, ValueError, "job_name='1abc' is not a portable job name"),
        ({"job_extra_directives": "--exclusive"}, ValueError, "is not a list of strings"),
        ({"job_extra_directives": ["a\nb"]}, ValueError, "spans several lines"),
        ({"job_script_prologue": [1]}, ValueError, "holds 1, which is not a string"),
        ({"resources": {"GPU": "many"}}, ValueError, "resources\\['GPU'\\]='many' is not a number"),
        ({"resources": ["GPU"]}, ValueError, "is not a mapping like"),
        ({"gpus": -1}, ValueError, "gpus=-1 must be 0 or more; use 0 or a positive integer"),
        ({"gpus": 1.5}, ValueError, "gpus=1.5 is not a whole number; use 0 or a positive"),
        ({"shebang": "bash"}, ValueError, "shebang='bash' is not a '#!' line"),
        ({"log_directory": "a\nb"}, ValueError, "log_directory='a\\\\nb' is not a path"),
        ({"log_directory": "/my logs"}, ValueError, "cannot go in a directive line"),
        (
            {"nodes": 2, "_system": "sge"},
            ValueError,
            r"nodes=2: SGECluster starts the workers of a job on one node \(Grid Engine has no "
            r"portable way .*\); ask for one-node jobs instead, e\.g\. nodes=1 with "
            r"scale\(jobs=2\) or job_array=2 \(LSFCluster, PBSCluster, SLURMCluster start",
        ),
        ({"pe": "", "_system": "sge"}, ValueError, "pe='' is not a single word"),
        ({"pbs_flavor": "slurm", "_system": "pbs"}, ValueError, "pbs_flavor='slurm' is not one of"),
        ({"lsf_units": "XB", "_system": "lsf"}, ValueError, "lsf_units='XB' is not one of"),
    ],
)
def test_bad_options_are_refused_with_name_value_and_form(options, error, message):
    system = options.pop("_system", "slurm")
    with pytest.raises(error, match=message):
        spec(system, **options)


def test_a_bad_option_fails_the_cluster_before_any_scheduler_or_job_starts(monkeypatch):
    from jobqueue_ms.batch.slurm import SLURMCluster

    def refuse(*args, **kwargs):
        raise AssertionError("nothing may start for a bad option")

    monkeypatch.setattr("jobqueue_ms.batch.base.run_command", refuse)
    monkeypatch.setattr("subprocess.Popen", refuse)
    with pytest.raises(ValueError, match="memory='lots'"):
        SLURMCluster(cores=1, memory="lots", config=EMPTY)
    with pytest.raises(TypeError, match=r"did you mean 'walltime'\?"):
        SLURMCluster(cores=1, memory="1GB", waltime="1:00:00", config=EMPTY)
    with pytest.raises(ValueError, match="scheduler_placement='remote' is not one of"):
        SLURMCluster(cores=1, memory="1GB", scheduler_placement="remote", config=EMPTY)
    with pytest.raises(ValueError, match="n_schedulers=0 must be a positive integer"):
        SLURMCluster(cores=1, memory="1GB", n_schedulers=0, config=EMPTY)
    with pytest.raises(
        ValueError,
        match=r"interface='nosuch0' does not exist on .*; known: .*\blo \(127\.0\.0\.1\).* "
        r"this machine is where the schedulers run \(scheduler_placement='local'\)",
    ):
        SLURMCluster(cores=1, memory="1GB", interface="nosuch0", config=EMPTY)


def test_every_system_option_belongs_to_one_system():
    owners = {
        name: sorted(
            s
            for s in ("slurm", "sge", "pbs", "lsf")
            if name in BatchCluster.for_system(s).system_options
        )
        for name in JobSpec.SYSTEM_OPTIONS
    }
    assert owners == {
        "pe": ["sge"],
        "memory_resources": ["sge"],
        "pbs_flavor": ["pbs"],
        "lsf_units": ["lsf"],
    }


def test_errors_show_the_accepted_options():
    with pytest.raises(TypeError) as info:
        spec(colour="red")
    accepted = re.search(r"Accepted options: (.*)", str(info.value)).group(1).split(", ")
    assert {"cores", "memory", "walltime", "job_extra_directives"} <= set(accepted)


def test_gpus_may_be_zero():
    assert spec(gpus=0).gpus == 0 and spec(gpus="0").gpus == 0 and spec(gpus=2).gpus == 2
