"""The one Jinja2 environment over ``templates/``: job scripts are rendered here and nowhere else.

Set up once per template search path with ``StrictUndefined`` (a typo in a template fails instead
of printing nothing), ``trim_blocks``, ``lstrip_blocks`` and ``keep_trailing_newline``.

Where templates are found, first match wins:

1. the user's template directories (``template_dirs=``), so a user can shadow a built-in template
   by giving a file the same name (``slurm.sh.j2``, or ``base.sh.j2`` for every system);
2. the built-in templates: ``jobqueue_ms/templates/`` in an installed package (setup.cfg maps
   the package ``jobqueue_ms.templates`` onto the top-level ``templates/`` folder), or
   ``templates/`` next to the package in a source checkout.

``builtin/<name>`` always names the built-in template, so a shadowing ``base.sh.j2`` can still
``{% extends "builtin/base.sh.j2" %}``. A full override is a template *file*: ``render()``
reads it and renders it in the same environment, so it may extend the built-ins too.

The context a job script template receives is documented in ``templates/base.sh.j2``.
"""

from __future__ import annotations

import functools
import os
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2

BASE_TEMPLATE = "base.sh.j2"
_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def builtin_template_dir() -> Path:
    """Return the directory of the built-in templates, installed or in a source checkout.

    Raises
    ------
    FileNotFoundError
        When no candidate holds ``base.sh.j2`` (a package built without its templates).
    """
    # Installed (wheel or sdist): setup.cfg puts them in the package as jobqueue_ms/templates/.
    # A checkout (or an editable install, whose finder cannot map a directory without an
    # __init__.py): the top-level templates/ next to the package.
    candidates = [_PACKAGE_DIR / "templates", _PACKAGE_DIR.parent / "templates"]
    for candidate in candidates:
        if (candidate / BASE_TEMPLATE).is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"the built-in job script templates are missing (looked in {looked}); "
        "reinstall jobqueue-ms, or check that setup.cfg still ships jobqueue_ms.templates"
    )


def builtin_templates() -> list[str]:
    """Names of the built-in templates (``base.sh.j2``, ``slurm.sh.j2``...)."""
    return sorted(p.name for p in builtin_template_dir().glob("*.j2"))


def shell_quote(value: object) -> str:
    """Quote one word for bash; plain words stay as they are (``'a b'``, ``tcp://h:1``)."""
    return shlex.quote(str(value))


def shell_join(words: Iterable[object]) -> str:
    """Quote and join words into one bash command line."""
    return " ".join(shlex.quote(str(word)) for word in words)


def without_lines_containing(text: str, needles: Iterable[str]) -> str:
    """Drop every line of ``text`` that contains one of ``needles`` (``job_directives_skip``)."""
    skip = [needle for needle in needles if needle]
    if not skip:
        return text
    kept = [line for line in text.splitlines(keepends=True) if not any(s in line for s in skip)]
    return "".join(kept)


def memory_text(n_bytes: int) -> str:
    """Bytes as people and the runtime read them: ``8GiB``, ``4GB``, ``500MiB``, else bytes.

    The largest unit that divides exactly wins, binary before decimal at the same scale.
    """
    units = (
        ("TiB", 1024**4),
        ("TB", 1000**4),
        ("GiB", 1024**3),
        ("GB", 1000**3),
        ("MiB", 1024**2),
        ("MB", 1000**2),
        ("KiB", 1024),
        ("kB", 1000),
    )
    for unit, size in units:
        if n_bytes >= size and n_bytes % size == 0:
            return f"{n_bytes // size}{unit}"
    return str(n_bytes)


def seconds(value: float) -> str:
    """Whole seconds with a unit, for runtime flags like ``--lifetime``: ``3300s``."""
    return f"{int(value)}s"


GENERIC_FILTERS: dict[str, Callable[..., Any]] = {
    "shell_quote": shell_quote,
    "shell_join": shell_join,
    "without_lines_containing": without_lines_containing,
    "memory_text": memory_text,
    "seconds": seconds,
}


@functools.lru_cache(maxsize=32)
def environment(
    search_path: tuple[str, ...] = (),
    filters: tuple[tuple[str, Callable[..., Any]], ...] = (),
) -> jinja2.Environment:
    """Return the environment for these user template directories and extra filters (cached).

    Parameters
    ----------
    search_path
        User template directories, searched before the built-in ones.
    filters
        ``(name, function)`` pairs added to the generic filters (the batch systems' units).
    """
    builtin = str(builtin_template_dir())
    loader = jinja2.ChoiceLoader(
        [
            jinja2.FileSystemLoader([*search_path, builtin]),
            jinja2.PrefixLoader({"builtin": jinja2.FileSystemLoader(builtin)}),
        ]
    )
    env = jinja2.Environment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters.update(GENERIC_FILTERS)
    env.filters.update(dict(filters))
    return env


def template_source(template: str | os.PathLike[str]) -> str | Path:
    """Read a user's ``template=`` choice: a template file (a Path) or a template name (a str).

    An existing file wins, so ``template="mine.sh.j2"`` with that file in the current directory
    is the file, not a template of that name. A path-like value, or text with a path separator
    or a leading ``~``, is a file path even when missing (``render`` then says so). Anything
    else is a name looked up in the template directories and the built-ins.
    """
    if isinstance(template, os.PathLike):
        return Path(template).expanduser()
    if os.sep in template or template.startswith("~") or Path(template).is_file():
        return Path(template).expanduser()
    return template


def render(
    template: str | os.PathLike[str],
    context: Mapping[str, Any],
    *,
    template_dirs: Sequence[str | os.PathLike[str]] = (),
    filters: Mapping[str, Callable[..., Any]] | None = None,
) -> str:
    """Render a template by name (``"slurm.sh.j2"``) or from a file path (a full override).

    Parameters
    ----------
    template
        A template name looked up in ``template_dirs`` then the built-ins, or the path of a
        template file: a ``Path``, or text with a path separator (``./mine.sh.j2``) or starting
        with ``~``. A user's choice goes through :func:`template_source` first, so that an
        existing file without a separator (``mine.sh.j2``) is read as a file too.
    context
        The variables the template sees.
    template_dirs
        User directories searched first; a file there shadows the built-in of the same name.
    filters
        Extra filters by name.

    Raises
    ------
    jinja2.TemplateNotFound
        No such template in ``template_dirs`` or the built-ins.
    jinja2.UndefinedError
        The template used a variable the context does not have.
    """
    search_path = tuple(str(Path(d).expanduser()) for d in template_dirs)
    env = environment(search_path, tuple(sorted((filters or {}).items())))
    text = os.fspath(template)
    if isinstance(template, os.PathLike) or os.sep in text or text.startswith("~"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"template={text!r}: no such template file")
        code = env.compile(path.read_text(encoding="utf-8"), name=path.name, filename=str(path))
        compiled = env.template_class.from_code(env, code, env.make_globals(None))
        return compiled.render(context)
    return env.get_template(text).render(context)
