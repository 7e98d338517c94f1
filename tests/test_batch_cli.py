"""``jobqueue-ms render``: print the job script a batch cluster would submit, starting nothing."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from jobqueue_ms.batch.base import render_job_script
from jobqueue_ms.cli import main
from jobqueue_ms.config import ENV_SITE_CONFIG, ENV_USER_CONFIG


@pytest.fixture
def runner(tmp_path, monkeypatch) -> CliRunner:
    """A runner whose config files are this test's own (none unless written)."""
    monkeypatch.setenv(ENV_USER_CONFIG, str(tmp_path / "user.toml"))
    monkeypatch.setenv(ENV_SITE_CONFIG, str(tmp_path / "site.toml"))
    for variable in [
        v for v in os.environ if v.startswith(("JOBQUEUE_MS_SLURM_", "JOBQUEUE_MS_SGE_"))
    ]:
        monkeypatch.delenv(variable)
    from jobqueue_ms.config import get_config

    get_config.cache_clear()
    yield CliRunner()
    get_config.cache_clear()


def test_render_prints_the_script_render_job_script_gives(runner):
    args = ["render", "--system", "slurm", "--cores", "8", "--memory", "16GiB",
            "--processes", "2", "--walltime", "01:00:00", "--queue", "normal",
            "--job-extra-directive", "--exclusive", "--worker-extra-arg=--no-nanny",
            "--python", "/opt/venv/bin/python"]  # fmt: skip
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output == render_job_script(
        "slurm",
        cores=8,
        memory="16GiB",
        processes=2,
        walltime="01:00:00",
        queue="normal",
        job_extra_directives=["--exclusive"],
        worker_extra_args=["--no-nanny"],
        python="/opt/venv/bin/python",
    )
    assert "#SBATCH --exclusive\n" in result.output


def test_render_applies_the_config_file(runner, tmp_path):
    (tmp_path / "user.toml").write_text("[sge]\ncores = 4\nmemory = '8GiB'\npe = 'mpi'\n")
    result = runner.invoke(main, ["render", "--system", "sge", "--queue", "all.q"])
    assert result.exit_code == 0, result.output
    assert "#$ -pe mpi 4\n" in result.output and "#$ -q all.q\n" in result.output


def test_render_refuses_bad_options_in_one_line(runner):
    result = runner.invoke(main, ["render", "--system", "slurm", "--cores", "0", "--memory", "1GB"])
    assert result.exit_code == 1
    message = "cores=0 must be at least 1; use a positive integer like 8"
    assert result.output == f"jobqueue-ms: error: ValueError: {message}\n"
    result = runner.invoke(main, ["render", "--system", "slurm", "--cores", "1", "--memory",
                                  "1GB", "--pe", "smp"])  # fmt: skip
    assert result.exit_code == 1
    assert "SLURMCluster() got an unknown option 'pe'" in result.output


def test_render_the_scheduler_job(runner):
    args = ["render", "--system", "pbs", "--pbs-flavor", "torque", "--cores", "2",
            "--memory", "4GiB", "--role", "scheduler", "--n-schedulers", "2"]  # fmt: skip
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.count(" -m jobqueue_ms scheduler ") == 2
    assert "#PBS -l nodes=1:ppn=2,mem=4gb\n" in result.output


def test_render_with_a_shadowing_template_directory_and_an_array(runner, tmp_path):
    (tmp_path / "slurm.sh.j2").write_text(
        '{% extends "base.sh.j2" %}\n'
        "{% block directives %}#SBATCH --job-name={{ name }} # site template{% endblock %}\n"
        "{% block array_task_index %}SLURM_ARRAY_TASK_ID{% endblock %}\n"
    )
    args = ["render", "--system", "slurm", "--cores", "2", "--memory", "1GiB", "--job-array", "3",
            "--resource", "GPU=1", "--template-dir", str(tmp_path), "--name", "site-7",
            "--scheduler-address", "tcp://10.0.0.1:8786"]  # fmt: skip
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output == render_job_script(
        "slurm",
        cores=2,
        memory="1GiB",
        job_array=3,
        resources=["GPU=1"],
        template_dirs=[str(tmp_path)],
        name="site-7",
        scheduler_addresses=["tcp://10.0.0.1:8786"],
    )
    assert result.output.splitlines()[1] == "#SBATCH --job-name=site-7 # site template"
    assert "--scheduler tcp://10.0.0.1:8786\n" in result.output
    assert "--resources GPU=1\n" in result.output
