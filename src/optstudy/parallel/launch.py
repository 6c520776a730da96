"""Starting, watching and stopping the processes of a parallel run, as torchrun and Lightning's DDP do.

``launch(entry, nprocs, args)`` starts ``nprocs`` processes with ``torch.multiprocessing.start_processes`` (the
``spawn`` method: fresh interpreters, never a fork of a parent that holds threads or an MLflow client) and
``MASTER_ADDR``/``MASTER_PORT`` set to a free local port, so that ``torch.distributed.init_process_group`` finds its
rendezvous from the environment (``env://``). Every process runs ``entry(rank, world, reports, *args)``, ``reports``
a ``torch.multiprocessing`` queue to the parent, whose ``on_report`` handles each report while it waits.

Shutdown is the parent's job, in one place:

- a process that raises writes its error (type, one-line message, exit code) to ``<errors>/<rank>.json`` and exits
  non-zero; one killed by a signal leaves no file. Either way ``ProcessContext.join`` notices at once (it waits on
  every process's sentinel), and the parent then terminates the others (SIGTERM, SIGKILL after 5 s) and raises the
  first error as an ``OptstudyError`` with that one line (``ParallelFailed`` for a crash or a kill);
- a process whose entry returned leaves with ``os._exit(0)``, without the interpreter's finalisation (where
  gloo's threads sometimes aborted a finished process);
- Ctrl-C: the children ignore SIGINT (the terminal sends it to the whole process group), the parent stops them
  and re-raises ``KeyboardInterrupt``;
- the parent itself killed (SIGKILL, OOM): every child asked Linux for SIGKILL when its parent dies
  (``PR_SET_PDEATHSIG``), so none is left behind as an orphan.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

import torch.multiprocessing as mp

from optstudy.errors import OptstudyError


class ParallelFailed(OptstudyError):
    """A process of a parallel run crashed or was killed; the others were stopped."""

    exit_code = 1  # not 2: nothing was wrong with the input


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it), for torch.distributed's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies, so a killed launcher leaves no orphans."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() == 1:  # the parent died before prctl: nobody would stop us
        os._exit(1)


def _entry(rank: int, entry, world: int, port: int, errors: str, args: tuple) -> None:
    """What every process runs first: shutdown rules, the rendezvous environment, then ``entry``."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent decides and stops us (SIGTERM)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    try:
        entry(rank, world, *args)
    except BaseException as exc:
        code = getattr(exc, "exit_code", 1)
        message = str(exc) if isinstance(exc, OptstudyError) else f"{type(exc).__name__}: {exc}"
        Path(errors, f"{rank}.json").write_text(json.dumps(
            {"type": type(exc).__name__, "message": message.splitlines()[0] if message else type(exc).__name__,
             "exit_code": code, "time": time.time(), "traceback": traceback.format_exc()}))
        raise
    # A finished process leaves without the interpreter's finalisation: there gloo's threads sometimes abort it
    # ("terminate called without an active exception", SIGABRT: 1 sync EASGD run in 12-20 here, after its work
    # was done), which failed the run. What it hands over is written by now: reports go to the queue's pipe as they
    # are put, checkpoints are closed files.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(entry, nprocs: int, args: tuple, errors: Path, roles=None, on_report=None) -> None:
    """Runs ``entry(rank, nprocs, reports, *args)`` in ``nprocs`` spawned processes and waits for all of them,
    handing what they put on ``reports`` to ``on_report``; raises the first failure (see the module docstring).
    ``roles(rank)`` names a process in messages (``the parameter server (rank 0)``, ``worker 1 (rank 2)``).
    ``errors``: an existing empty directory for the processes' error files."""
    roles = roles or (lambda rank: f"process {rank}")
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)  # its "Terminating process" lines
    reports = mp.get_context("spawn").SimpleQueue()
    context = mp.start_processes(_entry, args=(entry, nprocs, free_port(), str(errors), (reports, *args)),
                                 nprocs=nprocs, join=False, start_method="spawn")

    def drain():
        while not reports.empty():
            report = reports.get()
            if on_report is not None:
                on_report(report)

    try:
        while not context.join(timeout=0.2):
            drain()
        drain()
    except mp.ProcessExitedException as exc:  # killed by a signal, or exited non-zero without raising
        drain()  # the curves up to there (writes under PIPE_BUF to the queue's pipe are atomic: no half report)
        _stop(context)
        raise _first_error(errors, roles) or ParallelFailed(_exit_line(exc, context, roles)) from None
    except mp.ProcessRaisedException:
        drain()
        _stop(context)
        raise _first_error(errors, roles) or ParallelFailed("a process of the run failed") from None
    except BaseException:  # KeyboardInterrupt, SystemExit (a study worker's SIGTERM): stop everyone, then go on
        _stop(context)
        raise


def _stop(context) -> None:
    """SIGTERM to every process still alive, SIGKILL to those alive 5 s later; reaps them all."""
    alive = [p for p in context.processes if p.is_alive()]
    for p in alive:
        p.terminate()
    end = time.monotonic() + 5
    for p in alive:
        p.join(max(0.0, end - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _exit_line(exc, context, roles) -> str:
    how = f"was killed by {exc.signal_name}" if exc.signal_name else f"exited with code {exc.exit_code}"
    pid = context.processes[exc.error_index].pid
    return f"{roles(exc.error_index)} (pid {pid}) {how}; the run's other processes were stopped"


def _first_error(errors: Path, roles) -> OptstudyError | None:
    """The earliest error a process wrote, as the exception its type maps to (a diverged run stays ``Diverged``,
    exit 3; a config mistake ``ConfigError``, exit 2); None when no process wrote one (killed by a signal)."""
    found = []
    for path in Path(errors).glob("*.json"):
        try:
            found.append((json.loads(path.read_text()), int(path.stem)))
        except (OSError, ValueError):  # written while it was being killed
            continue
    if not found:
        return None
    error, rank = min(found, key=lambda e: e[0]["time"])
    from optstudy.errors import ConfigError
    from optstudy.lit import Diverged

    kind = {"Diverged": Diverged, "ConfigError": ConfigError}.get(error["type"], ParallelFailed)
    if kind is ParallelFailed:
        exc = ParallelFailed(f"{roles(rank)} failed: {error['message']}; the run's other processes were stopped")
    else:
        exc = kind(error["message"])
    exc.traceback = error["traceback"]  # the child's, for a caller who wants it
    return exc
