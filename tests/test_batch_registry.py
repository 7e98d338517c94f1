"""A new batch system is one class and one template: every list of systems comes from a registry.

The test declares a toy system in the test itself, with one option of its own, and checks that
the registry, the config file sections, ``jobqueue-ms render --system``, the error naming the
known systems and JobSpec all know it, without any list being edited.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from jobqueue_ms.batch import base, spec
from jobqueue_ms.batch.base import BatchCluster, batch_systems, render_job_script
from jobqueue_ms.batch.spec import JobSpec, SystemOption, one_of
from jobqueue_ms.cli import main
from jobqueue_ms.config import ENV_SITE_CONFIG, ENV_USER_CONFIG, Config, ConfigError, get_config
from jobqueue_ms.deploy.cluster import JobState

TOY_TEMPLATE = """\
{% extends "base.sh.j2" %}
{% block directives %}
#TOY name={{ name }} cores={{ job.cores }} class={{ job.toy_class }}
{% endblock %}
{% block array_task_index %}TOY_TASK{% endblock %}
"""


@pytest.fixture
def toy(monkeypatch, tmp_path) -> type[BatchCluster]:
    """A toy system registered for this test only, with its template in tmp_path."""
    batch_systems()  # the real ones first, then a registry this test may change
    monkeypatch.setattr(base, "_SYSTEMS", dict(base._SYSTEMS))
    monkeypatch.setattr(spec, "_DECLARED", dict(spec._DECLARED))
    (tmp_path / "toy.sh.j2").write_text(TOY_TEMPLATE)

    class ToyCluster(BatchCluster):
        """Toy queue: tsub / tstat / tdel."""

        system = "toy"
        template = "toy.sh.j2"
        directive_prefix = "#TOY"
        submit_cmd = ("tsub",)
        status_cmd = ("tstat",)
        cancel_cmd = ("tdel",)
        job_id_pattern = r"^(?P<job_id>\d+)$"
        states = {"Q": JobState.PENDING, "R": JobState.RUNNING}
        log_name = "{name}.out"
        array_log_name = "{name}.{index}.out"
        system_options = {"toy_class": SystemOption("small", one_of("small", "big"))}

    return ToyCluster


def test_a_declared_system_is_known_everywhere(toy, tmp_path, monkeypatch):
    assert batch_systems()["toy"] is toy
    assert BatchCluster.for_system("toy") is toy
    assert "toy_class" in JobSpec.SYSTEM_OPTIONS
    with pytest.raises(ValueError, match="use one of lsf, pbs, sge, slurm, toy$"):
        BatchCluster.for_system("condor")

    # Its config section and environment variables.
    (tmp_path / "c.toml").write_text("[toy]\ncores = 3\n")
    config = Config.load(environ={"JOBQUEUE_MS_TOY_TOY_CLASS": "big"}, paths=[tmp_path / "c.toml"])
    assert config.options("toy", {}) == {"cores": 3, "toy_class": "big"}
    (tmp_path / "bad.toml").write_text("[condor]\ncores = 3\n")
    with pytest.raises(ConfigError, match=r"use one of .*\[slurm\], \[toy\], \[ssh\]"):
        Config.load(environ={}, paths=[tmp_path / "bad.toml"])

    # Its own option, validated and read by its template.
    script = render_job_script(
        "toy", memory="1GB", template_dirs=[str(tmp_path)], name="t-1", config=config
    )
    assert script.splitlines()[1] == "#TOY name=t-1 cores=3 class=big"
    with pytest.raises(ValueError, match="toy_class='huge' is not one of 'small', 'big'"):
        toy.make_spec(cores=1, memory="1GB", toy_class="huge", config=Config())
    with pytest.raises(TypeError, match="got an unknown option 'toy_class'"):
        BatchCluster.for_system("slurm").make_spec(
            cores=1, memory="1GB", toy_class="big", config=Config()
        )

    # And the CLI, with the option given through --option.
    monkeypatch.setenv(ENV_USER_CONFIG, str(tmp_path / "none.toml"))
    monkeypatch.setenv(ENV_SITE_CONFIG, str(tmp_path / "none.toml"))
    get_config.cache_clear()
    try:
        args = ["render", "--system", "toy", "--cores", "2", "--memory", "1GB", "--name", "t-2",
                "--template-dir", str(tmp_path), "--option", "toy_class=big"]  # fmt: skip
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert result.output.splitlines()[1] == "#TOY name=t-2 cores=2 class=big"
        result = CliRunner().invoke(main, ["render", "--system", "condor"])
        assert result.exit_code == 2
        assert "'condor' is not one of lsf, pbs, sge, slurm, toy" in result.output
    finally:
        get_config.cache_clear()


def test_a_half_written_system_fails_when_its_class_is_made(toy):
    with pytest.raises(TypeError, match="must declare cancel_cmd"):

        class NoCancel(toy):  # type: ignore[misc, valid-type]
            cancel_cmd = None  # type: ignore[assignment]

    with pytest.raises(TypeError, match=r"system_options\['cores'\] is a common option"):

        class Clash(toy):  # type: ignore[misc, valid-type]
            system_options = {"cores": SystemOption(1, one_of("1"))}
