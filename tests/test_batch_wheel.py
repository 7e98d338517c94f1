"""The templates ship with the package: render every golden case from installed copies.

setup.cfg maps the package ``jobqueue_ms.templates`` onto the top-level ``templates/`` folder,
which is easy to lose from a wheel. These build the wheel, install it into a fresh venv and
render every case of test_batch_templates.py there (and from the editable install), comparing
with the golden files byte for byte.
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
from test_batch_templates import CASES, GOLDEN, case_kwargs

REPO = Path(__file__).resolve().parents[1]

RENDER_ALL = textwrap.dedent(
    """
    import json, sys
    import jobqueue_ms
    from jobqueue_ms.batch.base import render_job_script
    from jobqueue_ms.config import Config
    from jobqueue_ms.deploy.render import builtin_template_dir, builtin_templates

    cases = json.load(open(sys.argv[1]))
    out = {
        "package": jobqueue_ms.__file__,
        "template_dir": str(builtin_template_dir()),
        "templates": builtin_templates(),
        "scripts": {key: render_job_script(system, config=Config(), **kwargs)
                    for key, (system, kwargs) in cases.items()},
    }
    json.dump(out, open(sys.argv[2], "w"))
    """
)


def render_all(python: Path, tmp_path: Path) -> dict:
    """Render every golden case with ``python`` from outside the checkout; check the bytes."""
    cases = {f"{s}/{c}": (s, case_kwargs(s, dict(o))) for (s, c), o in CASES.items()}
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "render_all.py").write_text(RENDER_ALL)
    proc = subprocess.run(
        [str(python), "render_all.py", "cases.json", "out.json"],
        cwd=tmp_path,  # not the checkout, so its jobqueue_ms is not importable from the cwd
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    expected = {"base.sh.j2", "slurm.sh.j2", "sge.sh.j2", "pbs.sh.j2", "lsf.sh.j2"}
    assert expected <= set(out["templates"])
    for key, script in out["scripts"].items():
        assert script == (GOLDEN / f"{key}.sh").read_text(), key
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
    try:
        dist = importlib.metadata.distribution("jobqueue-ms")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("jobqueue-ms is not installed (pip install -e .)")
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    if not direct_url.get("dir_info", {}).get("editable"):
        pytest.skip("jobqueue-ms is installed, but not in editable mode")
    out = render_all(Path(sys.executable), tmp_path)
    assert Path(out["package"]).is_relative_to(REPO)
    assert Path(out["template_dir"]) == REPO / "templates"
