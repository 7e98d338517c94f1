"""The templates ship with the package: render every golden case from installed copies.

setup.cfg maps the package ``jobqueue_ms.templates`` onto the top-level ``templates/`` folder,
which is easy to lose from a wheel. These build the wheel, install it into a fresh venv and
render there (and from the editable install) every golden case, through the public functions
that render them in use, comparing with the golden files byte for byte:

* the batch job scripts of test_batch_templates.py: ``render_job_script`` (base.sh.j2 and
  <system>.sh.j2);
* the ``jobqueue-ms submit --dry-run`` scripts of test_submit.py (mpi-base.sh.j2 and
  mpi-<system>.sh.j2), through the CLI as that test runs it;
* the SSH launch scripts (ssh.sh.j2), through ``render_script`` as SSHCluster calls it
  (the cases of tests/ssh_golden.py, copied next to the script).

Every template the package ships must have been rendered by at least one case.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import site
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest
from ssh_golden import GOLDEN as SSH_GOLDEN
from ssh_golden import GOLDEN_CASES as SSH_CASES
from test_batch_templates import ADDRESSES, CASES, GOLDEN, PY, case_kwargs
from test_submit import CASES as SUBMIT_CASES
from test_submit import COMMON as SUBMIT_COMMON
from test_submit import GOLDEN as SUBMIT_GOLDEN
from test_submit import PROJECT, SCRIPT_ARGS

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

RENDER_ALL = textwrap.dedent(
    """
    import json, os, sys, tempfile
    from click.testing import CliRunner
    import jobqueue_ms
    from jobqueue_ms.batch.base import render_job_script
    from jobqueue_ms.cli import main
    from jobqueue_ms.config import Config, get_config
    from jobqueue_ms.deploy.render import builtin_template_dir, builtin_templates
    from ssh_golden import render_case

    cases_path, out_path = (os.path.abspath(path) for path in sys.argv[1:3])
    cases = json.load(open(cases_path))
    scripts = {key: render_job_script(system, config=Config(), **kwargs)
               for key, (system, kwargs) in cases["batch"].items()}
    for key, (system, args) in cases["submit"].items():
        with tempfile.TemporaryDirectory() as work:  # as test_submit's dry runs do
            os.chdir(work)
            open("work.py", "w").write("print('hi')\\n")
            os.environ["JOBQUEUE_MS_CONFIG"] = os.path.join(work, "none.toml")
            os.environ["JOBQUEUE_MS_SITE_CONFIG"] = os.path.join(work, "none.toml")
            os.environ.pop("LSF_ENVDIR", None)
            get_config.cache_clear()
            result = CliRunner().invoke(main, ["submit", "--system", system, *args])
            assert result.exit_code == 0, (key, result.output)
            scripts[key] = result.stdout.replace(os.path.realpath(work), cases["project"])
    for key, (role, case) in cases["ssh"].items():
        scripts[key] = render_case(role, case)
    out = {
        "package": jobqueue_ms.__file__,
        "template_dir": str(builtin_template_dir()),
        "templates": builtin_templates(),
        "scripts": scripts,
    }
    json.dump(out, open(out_path, "w"))
    """
)


def render_all(python: Path, tmp_path: Path) -> dict:
    """Render every golden case with ``python`` from outside the checkout; check the bytes."""
    cases = {
        "batch": {f"{s}/{c}": (s, case_kwargs(s, dict(o))) for (s, c), o in CASES.items()},
        "submit": {
            f"submit/{s}/{c}": (s, [*SUBMIT_COMMON, *args, "--dry-run", "work.py", *SCRIPT_ARGS])
            for (s, c), args in SUBMIT_CASES.items()
        },
        "ssh": {f"ssh/{role}/{case}": (role, case) for role, case in SSH_CASES},
        "project": PROJECT,
        "addresses": ADDRESSES,
        "python": PY,
    }
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "render_all.py").write_text(RENDER_ALL)
    shutil.copy(TESTS / "ssh_golden.py", tmp_path / "ssh_golden.py")
    proc = subprocess.run(
        [str(python), "render_all.py", "cases.json", "out.json"],
        cwd=tmp_path,  # not the checkout, so its jobqueue_ms is not importable from the cwd
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    assert set(out["scripts"]) == {*cases["batch"], *cases["submit"], *cases["ssh"]}
    for key, script in out["scripts"].items():
        if key.startswith("submit/"):
            golden = SUBMIT_GOLDEN.parent / f"{key}.sh"
        elif key.startswith("ssh/"):
            golden = SSH_GOLDEN.parent / f"{key}.sh"
        else:
            golden = GOLDEN / f"{key}.sh"
        assert script == golden.read_text(), key
    # Every template shipped was rendered: each system's by its cases, the bases by all.
    rendered = {f"{s}.sh.j2" for s, _ in CASES} | {f"mpi-{s}.sh.j2" for s, _ in SUBMIT_CASES}
    rendered |= {"ssh.sh.j2", "base.sh.j2", "mpi-base.sh.j2"}
    assert set(out["templates"]) == rendered
    return out


def run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.slow
def test_installed_wheel_renders_every_template(tmp_path):
    source = tmp_path / "source"  # build from a copy: a build writes build/ and egg-info
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("jobqueue_ms", "templates"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, source / name)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)])
    (wheel,) = wheels.glob("jobqueue_ms-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)])
    # The dependencies (jinja2, pyzmq...) come from this venv; jobqueue_ms only from the wheel.
    (purelib,) = (env_dir / "lib").glob("python3*/site-packages")
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    out = render_all(python, tmp_path)
    assert Path(out["package"]).is_relative_to(purelib)
    assert Path(out["template_dir"]) == purelib / "jobqueue_ms" / "templates"


def test_editable_install_renders_from_the_checkout(tmp_path):
    # Every copy of the metadata: the checkout's own jobqueue_ms.egg-info (made by `pip install
    # -e`, and first on sys.path when pytest runs from the checkout) has no direct_url.json.
    found = [
        json.loads(d.read_text("direct_url.json") or "{}")
        for d in importlib.metadata.distributions()
        if (d.metadata["Name"] or "").replace("_", "-") == "jobqueue-ms"
    ]
    if not found:
        pytest.skip("jobqueue-ms is not installed (pip install -e .)")
    if not any(u.get("dir_info", {}).get("editable") for u in found):
        pytest.skip("jobqueue-ms is installed, but not in editable mode")
    out = render_all(Path(sys.executable), tmp_path)
    assert Path(out["package"]).is_relative_to(REPO)
    assert Path(out["template_dir"]) == REPO / "templates"
