"""The ``jobqueue-ms`` command: parse, call the library, print.

Heavy imports happen inside each command so that ``jobqueue-ms worker`` starts fast.
"""

from __future__ import annotations

import sys
from typing import Any

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


def _setup_logging(level: str) -> None:
    import logging

    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


def _security_options(f: Any) -> Any:
    """--keyfile, --insecure-plaintext and --max-message-bytes, shared by scheduler and worker."""
    f = click.option(
        "--max-message-bytes",
        default=None,
        help="Largest inbound message frame (e.g. 1GiB, the default); bigger ones disconnect "
        "the sender. Use the same value in every process of a cluster.",
    )(f)
    f = click.option(
        "--insecure-plaintext",
        is_flag=True,
        default=False,
        help="NO encryption and NO authentication: anyone who can reach the ports can run "
        "code as you. Only on a network you trust completely.",
    )(f)
    f = click.option(
        "--keyfile",
        default=None,
        type=click.Path(dir_okay=False),
        help="The cluster's CurveZMQ key file (mode 0600). Default: $JOBQUEUE_MS_KEYFILE, "
        "else the one the scheduler file names.",
    )(f)
    return f


def _parent_pid_option(f: Any) -> Any:
    return click.option(
        "--parent-pid",
        default=None,
        type=click.IntRange(min=1),
        help="Stop when process PID is no longer this one's parent (for launchers: pass your "
        "own pid, and the process ends with you even if you are killed).",
    )(f)


def _check_parent(parent_pid: int | None) -> None:
    import os

    if parent_pid is not None and os.getppid() != parent_pid:
        raise click.UsageError(f"--parent-pid {parent_pid}: that process is not our parent (gone?)")


def _max_message_bytes(value: str | None) -> int | None:
    from .units import parse_memory

    if value is None:
        return None
    try:
        return parse_memory(value, "--max-message-bytes")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-message-bytes") from None


@main.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (an interface's address; 0.0.0.0 only if you must).",
)
@click.option("--interface", default=None, help="Listen on this network interface (e.g. ib0).")
@click.option(
    "--port",
    default=0,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to listen on; 0 picks a free one.",
)
@click.option(
    "--scheduler-file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write the address here (JSON) once listening.",
)
@click.option("--cluster-id", default=None, help="Identifier of the cluster this scheduler serves.")
@_security_options
@click.option(
    "--max-tasks-per-client",
    default=None,
    type=click.IntRange(min=1),
    help="Tasks one client may hold here at once (default 1,000,000).",
)
@_parent_pid_option
@click.option("--log-level", default="warning", show_default=True)
def scheduler(
    host: str,
    interface: str | None,
    port: int,
    scheduler_file: str | None,
    cluster_id: str | None,
    keyfile: str | None,
    insecure_plaintext: bool,
    max_message_bytes: str | None,
    max_tasks_per_client: int | None,
    parent_pid: int | None,
    log_level: str,
) -> None:
    """Run a scheduler until interrupted.

    Connections are encrypted and authenticated with CurveZMQ. Without --keyfile (or
    $JOBQUEUE_MS_KEYFILE) the scheduler makes new keys, names their file in its scheduler
    file, and removes them when it stops.
    """
    import os
    import signal

    from .runtime.malloc import pin_mmap_threshold
    from .runtime.scheduler import DEFAULT_MAX_TASKS_PER_CLIENT, Scheduler
    from .runtime.security import ENV_KEYFILE, Security

    _setup_logging(log_level)
    _check_parent(parent_pid)
    pin_mmap_threshold()  # flat memory under large or hostile frames (runtime/malloc.py)
    if interface:
        host = _interface_address(interface)
    security = None  # new keys, owned by the scheduler
    if keyfile or insecure_plaintext or os.environ.get(ENV_KEYFILE):
        security = Security.from_options(keyfile, insecure_plaintext)
    s = Scheduler(
        host=host,
        port=port,
        scheduler_file=scheduler_file,
        cluster_id=cluster_id,
        security=security,
        max_message_bytes=_max_message_bytes(max_message_bytes),
        max_tasks_per_client=max_tasks_per_client or DEFAULT_MAX_TASKS_PER_CLIENT,
        parent_pid=parent_pid,
    )
    signal.signal(signal.SIGTERM, lambda *_: s.stop())
    try:
        s.run()
    except KeyboardInterrupt:
        pass
    finally:
        s.stop()  # however the loop ended: keys this scheduler made are removed


def _interface_address(interface: str) -> str:
    from .netif import InterfaceError, ipv4_address

    try:
        return ipv4_address(interface)
    except InterfaceError as exc:
        raise click.BadParameter(
            f"{exc}. Give one of them, or an address with --host", param_hint="--interface"
        ) from None


def _parse_resources(values: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in values:
        for part in item.split(","):
            name, sep, amount = part.partition("=")
            try:
                if not sep or not name:
                    raise ValueError
                out[name.strip()] = float(amount)
            except ValueError:
                raise click.BadParameter(
                    f"{part!r} is not NAME=AMOUNT (e.g. GPU=1)", param_hint="--resources"
                ) from None
    return out


@main.command()
@click.option(
    "--scheduler",
    "schedulers",
    multiple=True,
    help="Scheduler address tcp://host:port; repeat to serve several.",
)
@click.option(
    "--scheduler-file",
    "scheduler_files",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="Scheduler file(s) to read addresses from.",
)
@click.option(
    "--scheduler-file-timeout",
    default=300.0,
    show_default=True,
    help="Seconds to wait for the scheduler file(s) to appear.",
)
@click.option("--nthreads", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--memory-limit", default=None, help="e.g. 4GiB; pause at 80 %, restart at 95 %.")
@click.option("--name", default=None, help="Worker name (unique in the cluster).")
@click.option("--job", default=None, help="Name of the job that started this worker.")
@click.option("--resources", multiple=True, help="Abstract resources, e.g. GPU=1.")
@click.option("--lifetime", default=None, help="Drain and leave after this long (e.g. 55m).")
@click.option(
    "--local-directory",
    default=None,
    help="Scratch directory for the tasks (created; becomes TMPDIR). Default: $TMPDIR.",
)
@click.option(
    "--scheduler-lost-timeout",
    default="5m",
    show_default=True,
    help="Leave (exit 0) after this long with no scheduler reachable, e.g. 90s; 'never' waits "
    "for them forever.",
)
@click.option("--host", default=None, help="Address for the data port (default 127.0.0.1).")
@click.option("--interface", default=None, help="Network interface for the data port.")
@click.option(
    "--nanny/--no-nanny",
    default=True,
    show_default=True,
    help="Supervise the worker and restart it if it dies.",
)
@_security_options
@_parent_pid_option
@click.option("--log-level", default="warning", show_default=True)
def worker(
    schedulers: tuple[str, ...],
    scheduler_files: tuple[str, ...],
    scheduler_file_timeout: float,
    nthreads: int,
    memory_limit: str | None,
    name: str | None,
    job: str | None,
    resources: tuple[str, ...],
    lifetime: str | None,
    scheduler_lost_timeout: str,
    local_directory: str | None,
    host: str | None,
    interface: str | None,
    nanny: bool,
    keyfile: str | None,
    insecure_plaintext: bool,
    max_message_bytes: str | None,
    parent_pid: int | None,
    log_level: str,
) -> None:
    """Run a worker serving every scheduler given.

    Its keys: --keyfile, else $JOBQUEUE_MS_KEYFILE, else the key file a scheduler file names.
    """
    import os
    import time

    from .runtime.malloc import pin_mmap_threshold
    from .runtime.nanny import run_worker
    from .runtime.scheduler import read_scheduler_file
    from .runtime.security import Security
    from .units import parse_duration, parse_memory

    _setup_logging(log_level)
    _check_parent(parent_pid)
    pin_mmap_threshold()  # flat memory under large or hostile frames (runtime/malloc.py)
    addresses = list(schedulers)
    file_info = None
    deadline = time.monotonic() + scheduler_file_timeout
    for f in scheduler_files:
        while not os.path.exists(f):
            if time.monotonic() > deadline:
                raise click.UsageError(
                    f"scheduler file {f} did not appear within {scheduler_file_timeout} s"
                )
            time.sleep(0.1)  # polling a shared filesystem for another process's file
        file_info = read_scheduler_file(f)
        addresses.extend(file_info["addresses"])
    if not addresses:
        raise click.UsageError("give --scheduler tcp://host:port or --scheduler-file FILE")
    for a in addresses:
        if not a.startswith("tcp://"):
            raise click.BadParameter(f"{a!r} is not tcp://host:port", param_hint="--scheduler")
    try:
        limit = parse_memory(memory_limit, "--memory-limit") if memory_limit else None
        life = parse_duration(lifetime, "--lifetime") if lifetime else None
        lost = None  # 'never'; parse_duration refuses anything not positive
        if scheduler_lost_timeout.strip().lower() != "never":
            lost = parse_duration(scheduler_lost_timeout, "--scheduler-lost-timeout")
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if interface:
        host = _interface_address(interface)
    if local_directory:
        local_directory = os.path.abspath(os.path.expanduser(local_directory))
        try:
            os.makedirs(local_directory, exist_ok=True)
        except OSError as exc:
            raise click.BadParameter(str(exc), param_hint="--local-directory") from None
        os.environ["TMPDIR"] = local_directory  # tempfile in the tasks (and the nanny's child)
    security = Security.from_options(
        keyfile, insecure_plaintext, file_info, _max_message_bytes(max_message_bytes)
    )
    kwargs = {
        "schedulers": addresses,
        "security": security,
        "nthreads": nthreads,
        "memory_limit": limit,
        "name": name,
        "job": job,
        "resources": _parse_resources(resources),
        "lifetime": life,
        "scheduler_lost_timeout": lost,
        "host": host,
    }
    raise SystemExit(run_worker(kwargs, nanny=nanny, parent_pid=parent_pid))


@main.group()
def keys() -> None:
    """CurveZMQ key files, for schedulers and workers started by hand (docs/security.md)."""


@keys.command("new")
@click.option(
    "--directory",
    default=None,
    type=click.Path(file_okay=False),
    help="Where to put the key file: private (0700), visible to every node that runs a "
    "scheduler, worker or client. Default: $JOBQUEUE_MS_KEY_DIRECTORY or ~/.jobqueue-ms/keys.",
)
@click.option("--name", default="cluster", show_default=True, help="The file is NAME.keys.")
def keys_new(directory: str | None, name: str) -> None:
    """Make new keys for one cluster; print the key file's path (mode 0600).

    Then: jobqueue-ms scheduler --keyfile PATH ... and jobqueue-ms worker --keyfile PATH ...
    (or --scheduler-file, which names it); clients use Client(..., security=PATH).
    """
    from .runtime.security import Security

    click.echo(Security.generate(directory, name=name).path)


@main.command()
@click.option(
    "--schedulers", "n_schedulers", default=2, show_default=True, type=click.IntRange(min=1)
)
@click.option("--workers", "n_workers", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--tasks", "n_tasks", default=20000, show_default=True, type=click.IntRange(min=1))
def demo(n_schedulers: int, n_workers: int, n_tasks: int) -> None:
    """Run a real workload on a LocalCluster and print the answer and the throughput."""
    from .demo import run_demo

    run_demo(n_schedulers=n_schedulers, n_workers=n_workers, n_tasks=n_tasks, echo=click.echo)


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def mpi(args: tuple[str, ...]) -> None:
    """Start schedulers, workers and a script inside one MPI allocation (run under mpirun)."""
    from .mpi import main as mpi_main

    sys.exit(mpi_main(list(args), prog="jobqueue-ms mpi"))


# ---------------------------------------------------------------------------- render (issue 3)
# Options mirror BatchCluster's (docs/batch.md); an option not given leaves the config file's.
_RENDER_MANY = {
    "job_extra_directive": "job_extra_directives",
    "job_directives_skip": "job_directives_skip",
    "job_script_prologue": "job_script_prologue",
    "job_script_epilogue": "job_script_epilogue",
    "worker_extra_arg": "worker_extra_args",
    "resource": "resources",
    "memory_resource": "memory_resources",
    "template_dir": "template_dirs",
}


class _BatchSystem(click.ParamType):
    """A registered batch system's name, checked when used (importing them at start-up would
    slow every ``jobqueue-ms worker``)."""

    name = "system"

    @staticmethod
    def choices() -> list[str]:
        from .batch.base import batch_systems

        return list(batch_systems())

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[" + "|".join(self.choices()) + "]"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> str:
        if value in self.choices():
            return str(value)
        self.fail(f"{value!r} is not one of {', '.join(self.choices())}", param, ctx)


@main.command()
@click.option(
    "--system",
    required=True,
    type=_BatchSystem(),
    help="Batch system whose job script to print.",
)
@click.option(
    "--role", default="worker", show_default=True, type=click.Choice(["worker", "scheduler"])
)
@click.option("--cores", type=int, default=None, help="Cores per node, e.g. 8.")
@click.option("--memory", default=None, help="Memory per node, e.g. 16GiB.")
@click.option("--processes", type=int, default=None, help="Worker processes per node.")
@click.option("--nodes", type=int, default=None, help="Nodes per job (SLURM, PBS, LSF).")
@click.option("--queue", default=None)
@click.option("--account", default=None)
@click.option("--project", default=None, help="Same setting as --account.")
@click.option("--walltime", default=None, help="HH:MM:SS, minutes or D-HH:MM:SS.")
@click.option("--job-name", default=None)
@click.option("--job-extra-directive", multiple=True, help="Extra directive line (repeatable).")
@click.option("--job-directives-skip", multiple=True, help="Drop directives containing this.")
@click.option("--job-script-prologue", multiple=True, help="Shell line before the workers.")
@click.option("--job-script-epilogue", multiple=True, help="Shell line after the workers.")
@click.option("--worker-extra-arg", multiple=True, help="Extra worker argument (repeatable).")
@click.option("--python", default=None, help="Interpreter on the compute nodes.")
@click.option("--local-directory", default=None)
@click.option("--log-directory", default=None)
@click.option("--interface", default=None, help="Network interface, e.g. ib0.")
@click.option("--gpus", type=int, default=None)
@click.option("--resource", multiple=True, help="Worker resource NAME=AMOUNT (repeatable).")
@click.option("--job-array", type=int, default=None, help="Array tasks per submission.")
@click.option("--shebang", default=None)
@click.option("--pe", default=None, help="SGE parallel environment.")
@click.option("--memory-resource", multiple=True, help="SGE memory resource (repeatable).")
@click.option("--pbs-flavor", default=None, type=click.Choice(["pro", "torque"]))
@click.option("--lsf-units", default=None, help="LSF_UNIT_FOR_LIMITS (default: lsf.conf).")
@click.option(
    "--option",
    "system_option",
    multiple=True,
    metavar="NAME=VALUE",
    help="Any option of the system's own, e.g. --option pe=mpi (repeatable).",
)
@click.option("--n-schedulers", type=int, default=1, show_default=True)
@click.option("--scheduler-address", multiple=True, help="tcp://host:port (repeatable).")
@click.option("--name", default=None, help="Job name in the script (default <job-name>-1).")
@click.option("--template", default=None, help="Template file replacing the system's.")
@click.option("--template-dir", multiple=True, help="Directory shadowing built-in templates.")
@click.option("--shared-directory", default=None, help="Where scheduler files go.")
def render(
    system: str,
    role: str,
    n_schedulers: int,
    scheduler_address: tuple[str, ...],
    name: str | None,
    system_option: tuple[str, ...],
    **given: object,
) -> None:
    """Print the job script a batch cluster would submit, starting nothing."""
    from .batch.base import render_job_script

    options: dict[str, object] = {}
    for pair in system_option:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(
                f"{pair!r} is not NAME=VALUE, e.g. pe=mpi", param_hint="--option"
            )
        options[key.strip().replace("-", "_")] = value
    for key, value in given.items():
        if key in _RENDER_MANY:
            if value:
                options[_RENDER_MANY[key]] = list(value)  # type: ignore[call-overload]
        elif value is not None:
            options[key] = value
    script = render_job_script(
        system,
        role=role,
        n_schedulers=n_schedulers,
        scheduler_addresses=list(scheduler_address),
        name=name,
        **options,
    )
    click.echo(script, nl=False)


# ---------------------------------------------------------------------------- submit (issue 5)
# One batch job running the MPI bootstrap (jobqueue_ms/submit.py, docs/mpi.md). Values are taken
# as text and validated there, so every bad value gives one line naming it, before submitting.
@main.command(context_settings={"allow_interspersed_args": False})
@click.option("--system", default=None, help="slurm, sge, pbs or lsf.")
@click.option("--nodes", default=None, help="Nodes to allocate (default 1).")
@click.option("--tasks-per-node", default=None, help="MPI ranks per node (default 4).")
@click.option("--cpus-per-task", default=None, help="Cores per rank = threads per worker (1).")
@click.option("--schedulers", default=None, help="Scheduler ranks (default 1).")
@click.option("--walltime", default=None, help="HH:MM:SS, minutes or D-HH:MM:SS.")
@click.option("--memory", default=None, help="Memory per node, e.g. 16GiB (default: queue's).")
@click.option("--memory-limit", default=None, help="Memory limit per worker rank, e.g. 4GiB.")
@click.option("--queue", default=None, help="Queue or partition.")
@click.option("--account", default=None, help="Account or project to charge.")
@click.option("--launcher", default=None, help="mpiexec (default), mpirun or srun (SLURM).")
@click.option("--launcher-arg", multiple=True, help="Extra launcher argument (repeatable).")
@click.option("--prologue", multiple=True, help="Shell line run first, e.g. 'module load mpi'.")
@click.option("--python", default=None, help="Interpreter in the job (default: this one).")
@click.option("--job-name", default=None, help="Job name (default jqms-<script name>).")
@click.option("--log-directory", default=None, help="Where output and exit code go (default .).")
@click.option("--workdir", default=None, help="Directory the job runs in (default .).")
@click.option("--workers-everywhere/--no-workers-everywhere", default=None, help="Every rank too.")
@click.option("--interface", default=None, help="Ranks listen on this interface, e.g. ib0.")
@click.option("--host", default=None, help="Ranks listen on this address (one node only).")
@click.option("--pe", default=None, help="SGE parallel environment (default smp).")
@click.option("--pbs-flavor", default=None, help="PBS: pro (default) or torque.")
@click.option("--dry-run", is_flag=True, help="Print the job script; submit nothing.")
@click.option("--wait", is_flag=True, help="Follow the job; exit with the script's exit code.")
@click.argument("script", required=False)
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
def submit(
    system: str | None,
    script: str | None,
    script_args: tuple[str, ...],
    launcher_arg: tuple[str, ...],
    prologue: tuple[str, ...],
    dry_run: bool,
    wait: bool,
    **options: object,
) -> None:
    """Submit one batch job that runs SCRIPT under the MPI bootstrap; print its job id."""
    from .batch.base import CommandError
    from .submit import SubmitError, build_spec, render_submit_script
    from .submit import submit as submit_job

    if launcher_arg:
        options["launcher_args"] = list(launcher_arg)
    if prologue:
        options["prologue"] = list(prologue)
    try:
        spec = build_spec(system, script, script_args, **options)
    except SubmitError as exc:
        click.echo(f"jobqueue-ms submit: error: {' '.join(str(exc).split())}", err=True)
        sys.exit(2)
    if dry_run:
        click.echo(render_submit_script(spec), nl=False)
        return

    def say(text: str) -> None:
        click.echo(f"jobqueue-ms submit: {text}", err=True)

    try:
        job = submit_job(spec)
    except CommandError as exc:  # sbatch/qsub/bsub refused it: its own words, on one line
        say(f"error: {'; '.join(line.strip() for line in str(exc).splitlines() if line.strip())}")
        sys.exit(1)
    click.echo(job.job_id)

    say(f"job {job.job_id} ({spec.name}) submitted to {spec.system}; output: {job.log_path}")
    if not wait:
        return
    try:
        outcome = job.wait(
            on_state=lambda state: say(
                f"job {job.job_id} "
                + ("is no longer listed by the queue" if state.value == "UNKNOWN" else state.value)
            )
        )
    except KeyboardInterrupt:
        say(f"stopped following job {job.job_id}; it goes on (cancel: {job.cancel_command})")
        sys.exit(130)
    output = job.output()
    if output is None:
        say(f"no output at {job.log_path}")
    else:
        click.echo(output, nl=False)
    if outcome.recorded:
        say(f"job {job.job_id} {outcome.state.value}, script exit code {outcome.exit_code}")
    else:
        say(
            f"job {job.job_id} {outcome.state.value} without recording the script's exit "
            f"code at {job.exit_path}; exit code 1"
        )
    sys.exit(outcome.exit_code)
