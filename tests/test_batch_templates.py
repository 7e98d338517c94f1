"""Job script templates: golden files byte for byte, bash -n, shadowing and full overrides.

Each case renders one system's template from fixed options and compares the result with
``tests/golden/<system>/<case>.sh``. After a deliberate template change, rewrite the goldens with
``scripts/update-goldens`` and review the diff.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import jinja2
import pytest

from jobqueue_ms.batch.base import batch_systems, render_job_script
from jobqueue_ms.batch.units import FILTERS
from jobqueue_ms.config import Config
from jobqueue_ms.deploy.render import builtin_templates, render

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("UPDATE_GOLDENS") == "1"
ADDRESSES = ["tcp://10.1.0.5:40123", "tcp://10.1.0.5:40125"]
PY = "/opt/venv/bin/python"
FULL = {
    "queue": "normal",
    "account": "proj42",
    "walltime": "02:00:00",
    "log_directory": "/scratch/logs",
    "local_directory": "/tmp/jqms work",
    "interface": "ib0",
    "job_extra_directives": ["--extra-directive-a", "--extra-directive-b"],
    "job_script_prologue": ["source /etc/profile.d/modules.sh", "module load python/3.11"],
    "job_script_epilogue": ["echo 'job done'"],
    "worker_extra_args": ["--log-level", "info"],
    "resources": {"GPU": 2},
    "gpus": 2,
}

# (system, case) -> options; every built-in template appears, with representative options.
CASES: dict[tuple[str, str], dict] = {
    ("slurm", "basic"): {"cores": 8, "memory": "16GiB", "processes": 2, "walltime": "01:00:00"},
    ("slurm", "minimal"): {"cores": 1, "memory": "1GB"},
    ("slurm", "full"): {"cores": 8, "memory": "32GB", "processes": 4, **FULL},
    ("slurm", "skip"): {
        "cores": 4,
        "memory": "8GiB",
        "queue": "debug",
        "job_directives_skip": ["--mem", "--partition"],
        "job_extra_directives": ["--mem-per-cpu=2G"],
    },
    ("slurm", "array"): {"cores": 4, "memory": "8GiB", "processes": 2, "job_array": 5},
    ("slurm", "multinode"): {"cores": 8, "memory": "16GiB", "processes": 2, "nodes": 3},
    ("slurm", "multinode-array"): {"cores": 2, "memory": "2GiB", "nodes": 2, "job_array": 3},
    ("slurm", "scheduler"): {"cores": 8, "memory": "4GiB", "walltime": "12:00:00", "_role": 2},
    ("sge", "basic"): {"cores": 8, "memory": "16GiB", "processes": 2, "walltime": "01:00:00"},
    ("sge", "full"): {"cores": 8, "memory": "32GB", "processes": 4, "pe": "mpi-fill", **FULL},
    ("sge", "no-memory-resources"): {"cores": 2, "memory": "4GB", "memory_resources": []},
    ("sge", "array"): {"cores": 2, "memory": "4GiB", "job_array": 3},
    ("sge", "scheduler"): {"cores": 2, "memory": "4GiB", "interface": "ib0", "_role": 3},
    ("pbs", "pro"): {"cores": 24, "memory": "100GB", "processes": 4, "walltime": "01:00:00"},
    ("pbs", "torque"): {
        "cores": 24,
        "memory": "100GB",
        "walltime": "1:0:0",
        "pbs_flavor": "torque",
    },
    ("pbs", "pro-full"): {"cores": 8, "memory": "32GB", "processes": 4, **FULL},
    ("pbs", "torque-full"): {"cores": 8, "memory": "32GB", "pbs_flavor": "torque", **FULL},
    ("pbs", "pro-array"): {"cores": 4, "memory": "8GiB", "job_array": 10},
    ("pbs", "torque-array"): {
        "cores": 4,
        "memory": "8GiB",
        "job_array": 10,
        "pbs_flavor": "torque",
    },
    ("pbs", "scheduler"): {"cores": 4, "memory": "8GiB", "_role": 1},
    ("pbs", "pro-multinode"): {"cores": 8, "memory": "16GiB", "processes": 2, "nodes": 3},
    ("pbs", "torque-multinode"): {
        "cores": 4,
        "memory": "8GiB",
        "processes": 2,
        "nodes": 2,
        "gpus": 1,
        "pbs_flavor": "torque",
    },
    ("pbs", "pro-multinode-array"): {
        "cores": 2,
        "memory": "2GiB",
        "nodes": 2,
        "job_array": 3,
        "interface": "ib0",
    },
    ("lsf", "basic"): {"cores": 8, "memory": "16GiB", "processes": 2, "walltime": "01:00:00"},
    ("lsf", "units-mb"): {"cores": 1, "memory": "1.5GB", "walltime": "90s", "lsf_units": "MB"},
    ("lsf", "full"): {"cores": 8, "memory": "32GB", "processes": 4, "lsf_units": "GB", **FULL},
    ("lsf", "array"): {"cores": 4, "memory": "8GiB", "job_array": 4, "lsf_units": "KB"},
    ("lsf", "scheduler"): {"cores": 4, "memory": "8GiB", "lsf_units": "KB", "_role": 2},
    ("lsf", "multinode"): {"cores": 8, "memory": "16GiB", "processes": 2, "nodes": 3},
    ("lsf", "multinode-array"): {"cores": 2, "memory": "2GiB", "nodes": 2, "job_array": 3},
}


def case_kwargs(system: str, options: dict) -> dict:
    """Keyword arguments of render_job_script for one case (besides config)."""
    options = {"python": PY, **options}
    n_schedulers = options.pop("_role", None)
    if system == "lsf":
        options.setdefault("lsf_units", "KB")  # not this machine's lsf.conf
    if n_schedulers:
        return {
            "role": "scheduler",
            "n_schedulers": n_schedulers,
            "name": "jqms-golden-scheduler",
            "shared_directory": "/shared/jqms",
            **options,
        }
    return {"name": "jqms-golden-1", "scheduler_addresses": ADDRESSES, **options}


def render_case(system: str, options: dict) -> str:
    return render_job_script(system, config=Config(), **case_kwargs(system, options))


@pytest.mark.parametrize(("system", "case"), sorted(CASES), ids="/".join)
def test_golden(system, case):
    rendered = render_case(system, dict(CASES[system, case]))
    path = GOLDEN / system / f"{case}.sh"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rendered)
    assert path.read_text() == rendered, f"{path} differs; run scripts/update-goldens to review"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_every_golden_is_valid_bash():
    for path in sorted(GOLDEN.glob("*/*.sh")):
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{path}: {proc.stderr}"


def test_every_golden_file_has_a_case_and_every_template_a_golden():
    """Batch goldens here, SSH ones in test_ssh.py, `jobqueue-ms submit` ones in test_submit.py."""
    if UPDATE:
        pytest.skip("scripts/update-goldens is rewriting the goldens (test_submit.py's later)")
    from test_submit import CASES as SUBMIT_CASES
    from test_submit import GOLDEN as SUBMIT_GOLDEN

    on_disk = {(p.parent.name, p.stem) for p in GOLDEN.glob("*/*.sh")}
    assert on_disk == set(CASES)
    assert {system for system, _ in CASES} == set(batch_systems())
    # Every template someone runs has golden files: <system>.sh.j2 here, mpi-<system>.sh.j2 in
    # golden/submit/<system>/, ssh.sh.j2 in golden/ssh/<role>/; the bases are extended by all.
    golden_dirs = {
        **{f"{system}.sh.j2": GOLDEN / system for system, _ in CASES},
        **{f"mpi-{system}.sh.j2": SUBMIT_GOLDEN / system for system, _ in SUBMIT_CASES},
        "ssh.sh.j2": GOLDEN / "ssh",
    }
    bases = {"base.sh.j2", "mpi-base.sh.j2"}
    assert set(builtin_templates()) == set(golden_dirs) | bases
    for template, directory in golden_dirs.items():
        assert any(directory.rglob("*.sh")), f"{template} has no golden file in {directory}"


def test_a_typo_in_a_template_fails_instead_of_printing_nothing(tmp_path):
    (tmp_path / "slurm.sh.j2").write_text(
        '{% extends "builtin/slurm.sh.j2" %}\n'
        "{% block directives %}#SBATCH --qos={{ job.qos }}\n{% endblock %}\n"
    )
    with pytest.raises(jinja2.UndefinedError, match="qos"):
        render_job_script(
            "slurm", cores=1, memory="1GB", template_dirs=[str(tmp_path)], config=Config()
        )


def test_a_user_template_directory_shadows_a_builtin_by_name(tmp_path):
    (tmp_path / "slurm.sh.j2").write_text(
        '{% extends "builtin/slurm.sh.j2" %}\n'
        "{% block directives %}\n{{ super() }}#SBATCH --qos=high\n{% endblock %}\n"
    )
    plain = render_job_script("slurm", cores=1, memory="1GB", config=Config())
    shadowed = render_job_script(
        "slurm", cores=1, memory="1GB", template_dirs=[str(tmp_path)], config=Config()
    )
    assert shadowed == plain.replace(
        "#SBATCH --mem=954M\n", "#SBATCH --mem=954M\n#SBATCH --qos=high\n"
    )


def test_shadowing_base_changes_every_system(tmp_path):
    (tmp_path / "base.sh.j2").write_text(
        '{% extends "builtin/base.sh.j2" %}\n'
        "{% block launch_workers %}# site policy: no workers here\n{% endblock %}\n"
    )
    for system in ("sge", "pbs", "lsf"):
        script = render_job_script(
            system, cores=1, memory="1GB", template_dirs=[str(tmp_path)], config=Config()
        )
        assert "# site policy: no workers here\n" in script.splitlines(keepends=True)
        assert '"${worker[@]}"' not in script


def test_template_file_is_a_full_override(tmp_path):
    path = tmp_path / "mine.sh.j2"
    path.write_text("#!/bin/sh\n# {{ name }} {{ job.cores }} {{ job.memory_bytes | slurm_mem }}\n")
    script = render_job_script(
        "slurm", cores=2, memory="2GiB", template=str(path), name="j-1", config=Config()
    )
    assert script == "#!/bin/sh\n# j-1 2 2048M\n"
    with pytest.raises(FileNotFoundError, match="no such template file"):
        render_job_script(
            "slurm", cores=1, memory="1GB", template="./missing.sh.j2", config=Config()
        )


def test_a_missing_context_variable_fails():
    with pytest.raises(jinja2.UndefinedError, match="'job' is undefined"):
        render("slurm.sh.j2", {"name": "x"}, filters=FILTERS)


def test_a_template_file_in_the_current_directory_is_a_file_not_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.sh.j2").write_text("#!/bin/sh\n# {{ name }} {{ job.cores }}\n")
    script = render_job_script(
        "slurm", cores=2, memory="2GiB", template="mine.sh.j2", name="j-1", config=Config()
    )
    assert script == "#!/bin/sh\n# j-1 2\n"
    # Only a user's template= is read as a file: a file named like a built-in template in the
    # current directory does not replace the system's template.
    (tmp_path / "slurm.sh.j2").write_text("#!/bin/sh\n# not the built-in\n")
    builtin = render_job_script("slurm", cores=2, memory="2GiB", name="j-1", config=Config())
    assert builtin.startswith("#!/usr/bin/env bash\n#SBATCH --job-name=j-1\n")
    # A name that is no file stays a template name, looked up as before.
    with pytest.raises(jinja2.TemplateNotFound, match="theirs.sh.j2"):
        render_job_script("slurm", cores=1, memory="1GB", template="theirs.sh.j2", config=Config())


FAKE_PYTHON = """#!/bin/bash
# Stands in for python: records the worker's arguments and the node its launcher put it on.
name=unnamed; prev=
for arg in "$@"; do [ "$prev" = --name ] && name=$arg; prev=$arg; done
printf '%s\\n' "$@" "node=$FAKE_NODE" > "$CALLS/$name.args"
"""
FAKE_LAUNCHERS = {
    # pbsdsh -n <index> -- cmd (PBS Pro) | pbsdsh -h <host> cmd (Torque): the index counts the
    # lines of PBS_NODEFILE, one per node with mpiprocs=1.
    "pbsdsh": """#!/bin/bash
if [ "$1" = -n ]; then
    node=$(sed -n "$(($2 + 1))p" "$PBS_NODEFILE"); shift 2; [ "$1" = -- ] && shift
elif [ "$1" = -h ]; then node=$2; shift 2
else echo "fake pbsdsh: unexpected $*" >&2; exit 2; fi
FAKE_NODE=$node exec "$@"
""",
    "blaunch": """#!/bin/bash
node=$1; shift
FAKE_NODE=$node exec "$@"
""",
}


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(
    ("system", "options", "environment"),
    [
        ("pbs", {"pbs_flavor": "pro"}, {"nodefile": "n1\nn2\nn3\n"}),
        ("pbs", {"pbs_flavor": "torque"}, {"nodefile": "n1\nn1\nn2\nn2\nn3\nn3\n"}),
        ("lsf", {"lsf_units": "MB"}, {"LSB_MCPU_HOSTS": "n1 2 n2 2 n3 2"}),
    ],
    ids=["pbs-pro", "pbs-torque", "lsf"],
)
def test_a_multinode_script_starts_its_workers_on_every_node(
    system, options, environment, tmp_path
):
    """Run the rendered script with bash, fake launchers (pbsdsh, blaunch) and a fake python.

    The PBS and LSF stand-ins run one host only, so this checks the fan-out logic of the
    templates; the golden files pin their exact text. (SLURM's srun runs for real, in
    test_batch_real.py.)
    """
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    for name, text in {**FAKE_LAUNCHERS, "python": FAKE_PYTHON}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CALLS": str(calls)}
    if "nodefile" in environment:
        (tmp_path / "nodefile").write_text(environment["nodefile"])
        env["PBS_NODEFILE"] = str(tmp_path / "nodefile")
    else:
        env.update(environment)
    script = render_job_script(
        system,
        cores=2,
        processes=2,
        memory="2GiB",
        nodes=3,
        python=str(bin_dir / "python"),
        name="mn-1",
        scheduler_addresses=ADDRESSES[:1],
        config=Config(),
        **options,
    )
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    placed = {}
    for path in sorted(calls.glob("*.args")):
        args = path.read_text().splitlines()
        assert args[args.index("--host") + 1] == args[-1].removeprefix("node=")
        assert args[args.index("--scheduler") + 1] == ADDRESSES[0]
        placed[path.stem] = args[-1]
    assert placed == {
        "mn-1-0": "node=n1",
        "mn-1-1": "node=n1",
        "mn-1-2": "node=n2",
        "mn-1-3": "node=n2",
        "mn-1-4": "node=n3",
        "mn-1-5": "node=n3",
    }
