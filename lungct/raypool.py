"""One scan per task on Ray: a local Ray started for the run, or an existing Ray cluster.

Commands with ``--ray`` (``integration detect --scans``, ``lungct prepare``) hand their scans to
a pool of Ray actors, one CPU each. An actor sets itself up once (loads the models, say) and
then gets one scan at a time, so a worker holds one scan in memory; results come back to the
command as each scan finishes (``ray.wait``), in whatever order they finish.

``--ray-cpus N`` gives a local Ray started for the run N CPUs (default: every core) and so N
workers; with ``--ray-address ADDR`` the command joins a running cluster (``ray start --head``
on one machine, ``ray start --address ...`` on the others, or ``auto`` for the one this machine
belongs to) and runs at most ``--ray-cpus`` workers there (default: one per CPU of the
cluster). Every machine of a cluster must have the suite installed and see the scans and the
output folder at the same paths.

Ray is imported here only, and only when asked for: the suite works without it, and ``--ray``
without it installed is one line saying how to install it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from lungct.cli import positive_int
from lungct.errors import LungCTError

RAY_REQUIREMENT = "ray[data]==2.60.0"
"""The Ray the suite is tested with (pinned in requirements.txt)."""

LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024
"""Object store of a local Ray started for a run: only small results travel through it (the
scans are read and written by the workers themselves), so Ray's default of 30% of the memory
would only be taken from the workers."""

WORKER_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "KERAS_BACKEND": "tensorflow",
    # One CPU per worker: TensorFlow's thread pools sized to it, not to the machine.
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
    "OMP_NUM_THREADS": "1",
}
"""Environment of every worker process."""

T = TypeVar("T")


@dataclass(frozen=True)
class RayOptions:
    """Where to run: ``address`` None starts a local Ray with ``cpus`` CPUs (None: every core);
    with an ``address`` the run joins that cluster and uses at most ``cpus`` workers."""

    cpus: int | None = None
    address: str | None = None


@dataclass(frozen=True)
class WorkerLost:
    """The result of an item whose worker process died under it (killed, out of memory)."""

    reason: str


def add_ray_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """The ``--ray``, ``--ray-cpus`` and ``--ray-address`` options of a command."""
    parser.add_argument(
        "--ray",
        action="store_true",
        help=f"{what} as a Ray task: on a local Ray started for the run, or on the cluster of "
        f"--ray-address (needs {RAY_REQUIREMENT})",
    )
    parser.add_argument(
        "--ray-cpus",
        type=positive_int,
        metavar="N",
        help="with --ray: CPUs of the local Ray, one worker each (default: every core); with "
        "--ray-address: at most N workers on the cluster (default: one per CPU)",
    )
    parser.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="with --ray: join this running Ray cluster (host:port, or auto) instead of "
        "starting one; its machines must see the same paths",
    )


def ray_options_from_args(args: argparse.Namespace) -> RayOptions | None:
    """The :class:`RayOptions` of parsed ``--ray*`` options; None without ``--ray``.

    Raises:
        LungCTError: ``--ray-cpus`` or ``--ray-address`` without ``--ray``.
    """
    if not args.ray:
        if args.ray_cpus is not None or args.ray_address is not None:
            raise LungCTError(None, "--ray-cpus and --ray-address go with --ray")
        return None
    return RayOptions(cpus=args.ray_cpus, address=args.ray_address)


def import_ray(options: RayOptions | None = None) -> ModuleType:
    """The ``ray`` module, imported for a run with ``options`` (None: only to see that it is
    installed).

    To join a cluster with a token on this machine, Ray is told to send it: ``ray start``
    turns token authentication on by default, but a driver joining with
    ``ray.init(address=...)`` sends no token unless ``RAY_AUTH_MODE`` says so when Ray is
    first imported, and is turned away. A cluster without authentication accepts a driver
    that sends one.

    Raises:
        LungCTError: Ray is not installed.
    """
    joining = options is not None and options.address is not None
    if joining and "ray" not in sys.modules and "RAY_AUTH_MODE" not in os.environ:
        if _auth_token_available():
            os.environ["RAY_AUTH_MODE"] = "token"
    try:
        import ray
    except ImportError:
        raise LungCTError(
            None,
            f"--ray needs Ray, which is not installed here (pip install '{RAY_REQUIREMENT}', "
            "or leave out --ray to run in one process)",
        ) from None
    return ray


@contextlib.contextmanager
def ray_runtime(options: RayOptions) -> Iterator[ModuleType]:
    """Start a local Ray (or join ``options.address``) for the block; yield the ``ray`` module.

    A Ray this process had already started or joined is used as it is and left running;
    otherwise the block ends with ``ray.shutdown()``, which stops a local Ray and its workers.

    Raises:
        LungCTError: Ray is not installed, or the cluster cannot be reached.
    """
    token = _auth_token_available() if options.address else False
    ray = import_ray(options)
    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports from a run
    common: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    if options.address:
        _check_reachable(options.address)
    try:
        if options.address:
            ray.init(address=options.address, **common)
        else:
            ray.init(
                # "local": a Ray of its own, even where a cluster runs on this machine
                # (ray.init() alone would join that one).
                address="local",
                num_cpus=options.cpus or os.cpu_count() or 1,
                include_dashboard=False,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                **common,
            )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {options.address}" if options.address else "a local Ray"
        reason = " ".join(str(exc).split())[:200]
        hint = ""
        if options.address and not token:
            hint = (
                "; a cluster with token authentication (ray start's default) needs its token "
                f"here too: {DEFAULT_TOKEN_FILE} or RAY_AUTH_TOKEN"
            )
        raise LungCTError(None, f"cannot start or reach {where} ({reason}){hint}") from None
    try:
        with _sigterm_exits():
            yield ray
    finally:
        ray.shutdown()


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Refuse at once a ``host:port`` where nothing answers: ``ray.init`` would retry for
    minutes before it gives up. Other forms (``auto``, ``ray://...``) are left to Ray.

    Raises:
        LungCTError: nothing accepts a connection at ``address``.
    """
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or "/" in address:
        return
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise LungCTError(
            None, f"cannot reach the Ray cluster at {address} (nothing answers there: {reason})"
        ) from None


DEFAULT_TOKEN_FILE = "~/.ray/auth_token"
"""Where ``ray start`` keeps the token of a cluster with token authentication."""


def _auth_token_available() -> bool:
    """Whether this machine holds a Ray authentication token (``RAY_AUTH_TOKEN``, the file of
    ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser(DEFAULT_TOKEN_FILE)
    return os.path.isfile(path)


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM raises ``SystemExit(143)`` inside the block, so the run's clean-up (its tables,
    ``ray.shutdown()``) happens; Python's default is to die at once, leaving Ray running."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_now(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_now)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def worker_count(ray: ModuleType, options: RayOptions, items: int) -> int:
    """Workers (one CPU each) for ``items`` items: the CPUs of the local Ray, or of the cluster
    (at most ``options.cpus`` there), and never more than there are items."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if options.address and options.cpus:
        cpus = min(cpus, options.cpus)
    return max(1, min(cpus, items))


def one_line(exc: BaseException) -> str:
    """An exception as one line: a :class:`LungCTError`'s own message, else its type and the
    first line of its text."""
    if isinstance(exc, LungCTError):
        return " ".join(str(exc).split())
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def stream_on_actors(
    ray: ModuleType,
    worker_class: type,
    init_args: tuple,
    items: Sequence[T],
    workers: int,
) -> Iterator[tuple[T, Any]]:
    """Run ``worker_class(*init_args).run(item)`` for every item on ``workers`` Ray actors;
    yield ``(item, result)`` as each one finishes.

    ``worker_class`` is an importable class with ``ready() -> str | None`` (None once it is set
    up, else why it could not be: its ``__init__`` must catch its own errors) and
    ``run(item)``. Each actor has one CPU and one item at a time. An error raised by ``run``
    ends the whole run (raised here as the worker's own exception); an actor whose process dies
    yields :class:`WorkerLost` for its item and is replaced. Leaving the loop early (an error,
    Ctrl-C) stops every actor.

    Raises:
        LungCTError: a worker could not be set up (its ``ready()`` reason).
    """
    from ray.exceptions import RayActorError, RayTaskError

    remote_class = ray.remote(num_cpus=1, max_restarts=0)(worker_class)

    def start() -> Any:
        return remote_class.options(runtime_env={"env_vars": dict(WORKER_ENV)}).remote(*init_args)

    def check_ready(actors: list[Any]) -> None:
        try:
            reasons = ray.get([a.ready.remote() for a in actors])
        except RayActorError as exc:
            raise LungCTError(None, f"a Ray worker could not start ({_ray_reason(exc)})") from None
        for reason in reasons:
            if reason:
                raise LungCTError(None, reason)

    queue = list(items)[::-1]
    idle = [start() for _ in range(max(1, min(workers, len(queue))))] if queue else []
    everyone = list(idle)
    pending: dict[Any, tuple[Any, T]] = {}
    try:
        if idle:
            check_ready(idle)
        while queue or pending:
            while queue and idle:
                actor, item = idle.pop(), queue.pop()
                pending[actor.run.remote(item)] = (actor, item)
            done, _ = ray.wait(list(pending), num_returns=1)
            actor, item = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                raise (cause if isinstance(cause, BaseException) else exc) from None
            except RayActorError as exc:
                result = WorkerLost(_ray_reason(exc))
                with contextlib.suppress(Exception):
                    ray.kill(actor)
                actor = start()
                everyone.append(actor)
                check_ready([actor])
            idle.append(actor)
            yield item, result
    finally:
        for actor in everyone:
            with contextlib.suppress(Exception):
                ray.kill(actor)


def _ray_reason(exc: BaseException) -> str:
    """A dead Ray actor in one line: the last line of its creation error, or why a process
    dies under a task."""
    text = str(exc)
    if "creation task" in text:
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        return lines[-1][:200] if lines else type(exc).__name__
    return "its Ray worker process died (killed, or out of memory)"
