"""Config precedence: site file < user file < environment < keyword arguments."""

from __future__ import annotations

import sys

import pytest

from jobqueue_ms.batch.slurm import SLURMCluster
from jobqueue_ms.config import Config, ConfigError, site_config_path, user_config_path

SITE = """
[slurm]
queue = "site-queue"
account = "site-account"
cores = 4
memory = "8GiB"
walltime = 01:00:00          # an unquoted TOML time works too
job-extra-directives = ["--exclusive"]

[sge]
pe = "mpi"
"""

USER = """
[slurm]
account = "user-account"
cores = 8
"""


@pytest.fixture
def files(tmp_path):
    site, user = tmp_path / "site.toml", tmp_path / "user.toml"
    site.write_text(SITE)
    user.write_text(USER)
    return site, user


def test_precedence_site_user_environment_keywords(files):
    site, user = files
    environ = {"JOBQUEUE_MS_SLURM_CORES": "16", "JOBQUEUE_MS_SLURM_QUEUE": "env-queue"}
    config = Config.load(environ=environ, paths=[site, user])
    spec = SLURMCluster.make_spec(config=config, queue="kw-queue")
    assert spec.queue == "kw-queue"  # keyword beats the environment
    assert spec.cores == 16  # environment beats the user file
    assert spec.account == "user-account"  # user file beats the site file
    assert spec.memory_bytes == 8 * 2**30  # site file
    assert spec.walltime_s == 3600
    assert spec.job_extra_directives == ("--exclusive",)  # "-" spelled keys work
    assert config.origin("slurm", "cores") == "$JOBQUEUE_MS_SLURM_CORES"
    assert config.origin("slurm", "account") == str(user)
    assert config.files == (str(site), str(user))


def test_a_keyword_given_as_none_does_not_hide_the_config(files):
    config = Config.load(environ={}, paths=files)
    assert SLURMCluster.make_spec(config=config, queue=None).queue == "site-queue"


def test_environment_values_are_toml_when_they_can_be():
    environ = {
        "JOBQUEUE_MS_SLURM_CORES": "8",
        "JOBQUEUE_MS_SLURM_MEMORY": "16GB",
        "JOBQUEUE_MS_SLURM_WALLTIME": "01:30:00",  # a TOML time, but kept as text
        "JOBQUEUE_MS_SLURM_JOB_EXTRA_DIRECTIVES": '["--exclusive", "--qos=high"]',
        "JOBQUEUE_MS_SGE_PE": "smp",
        "JOBQUEUE_MS_CONFIG": "/nowhere.toml",  # where the user file is: not a setting
        "JOBQUEUE_MS_SOMETHING_ELSE": "x",  # not a section
    }
    config = Config.load(environ=environ, paths=[])
    assert config.sections == {
        "slurm": {
            "cores": 8,
            "memory": "16GB",
            "walltime": "01:30:00",
            "job_extra_directives": ["--exclusive", "--qos=high"],
        },
        "sge": {"pe": "smp"},
    }


def test_where_the_files_are():
    assert str(user_config_path({"JOBQUEUE_MS_CONFIG": "/a/b.toml"})) == "/a/b.toml"
    assert str(user_config_path({"XDG_CONFIG_HOME": "/x"})) == "/x/jobqueue-ms/config.toml"
    assert str(user_config_path({})).endswith("/.config/jobqueue-ms/config.toml")
    assert str(site_config_path({})) == "/etc/jobqueue-ms/config.toml"
    assert str(site_config_path({"JOBQUEUE_MS_SITE_CONFIG": "/s.toml"})) == "/s.toml"


def test_missing_files_are_skipped(tmp_path):
    assert Config.load(environ={}, paths=[tmp_path / "none.toml"]).sections == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[slurm\nqueue = 1", "not valid TOML"),
        (
            "[slurmm]\nqueue = 'x'",
            r"unknown section \[slurmm\]; use one of \[lsf\], \[pbs\], \[sge\], \[slurm\], \[ssh\]",
        ),
        ("slurm = 3", "slurm must be a table"),
    ],
)
def test_bad_files_are_named(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        Config.load(environ={}, paths=[path])
    assert str(path) in str(info.value)


def test_an_unknown_setting_names_the_file_it_came_from(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[slurm]\ncores = 1\nmemory = '1GB'\nqueu = 'debug'\n")
    with pytest.raises(TypeError, match=rf"{path} sets 'queu', which SLURMCluster does not know"):
        SLURMCluster.make_spec(config=Config.load(environ={}, paths=[path]))


def test_cluster_options_may_come_from_the_config_too(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        "[slurm]\ncores = 1\nmemory = '1GB'\npoll_interval = '30m'\nn_schedulers = 2\n"
        f"python = '{sys.executable}'\n"
    )
    config = Config.load(environ={}, paths=[path])
    assert SLURMCluster.make_spec(config=config).cores == 1  # cluster options are set aside
    with SLURMCluster(config=config, n_schedulers=3) as cluster:
        assert cluster.poll_interval_s == 1800
        assert len(cluster.scheduler_addresses) == 3  # the keyword wins
