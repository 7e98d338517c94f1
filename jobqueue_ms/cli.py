"""The ``jobqueue-ms`` command: parse, call the library, print.

Heavy imports happen inside each command so that ``jobqueue-ms worker`` starts fast.
"""

from __future__ import annotations

import sys

import click

from ._version import __version__


class _Group(click.Group):
    """A click group whose commands exit non-zero with a one-line reason instead of a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("jobqueue-ms: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - the CLI's edge: one line, non-zero exit
            click.echo(f"jobqueue-ms: error: {type(exc).__name__}: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="jobqueue-ms")
def main() -> None:
    """Run Python work on SLURM, SGE, PBS, LSF, SSH hosts or one MPI allocation."""
