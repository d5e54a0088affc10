"""Threads that share the machine: each adkit process uses its share of the cores it may run on.

torch starts as many intra-op threads as the machine has cores, in every process. Several adkit processes on one
small machine (a bench beside a test run beside a service, or torchrun ranks) then run several times more threads
than cores, and OpenMP threads that wait by spinning slow everyone far beyond their share (measured on 2 cores:
three `adkit synth` together took 3.75x the time of the three one after the other).

So each process registers itself in a folder of running adkit processes (one empty file per process id, removed
at exit; files of processes that died are ignored and cleaned up), and sets its threads to the cores it may use
(its CPU affinity) divided by the live processes, at least one. It looks again every few seconds while it works
(``rebalance``, called by the training and scoring loops), so a process takes the cores back when the others end.
``ADKIT_THREADS=N`` (or ``adkit --threads N``) fixes the count instead.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

ENV = "ADKIT_THREADS"
RECHECK_SECONDS = 2.0

_state: dict[str, float | int | Path | None] = {"checked": 0.0, "threads": 0, "registered": None}


def cores_available() -> int:
    """The cores this process may run on (its affinity mask), or the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def registry_folder() -> Path:
    from adkit.core.cache import cache_root

    return cache_root() / "running"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def live_processes(folder: Path | None = None) -> int:
    """Registered adkit processes still running (this one included once registered); stale files are removed."""
    folder = folder or registry_folder()
    count = 0
    for entry in folder.glob("*.pid") if folder.is_dir() else ():
        try:
            pid = int(entry.stem)
        except ValueError:
            continue
        if _alive(pid):
            count += 1
        else:
            entry.unlink(missing_ok=True)
    return max(count, 1)


def share(cores: int, processes: int) -> int:
    """Threads per process: the cores divided among the processes, at least one each."""
    return max(1, cores // max(1, processes))


def env_count(name: str, hint: str) -> int | None:
    """The environment variable ``name`` as a positive count, None when unset; a one-line error ending in
    ``hint`` when it is anything else."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        from adkit.core.errors import AdkitError

        raise AdkitError(f"{name}={text}: {hint}")
    return int(text)


def fixed_threads() -> int | None:
    """ADKIT_THREADS as a count, None when unset; a one-line error when it is not a positive integer."""
    return env_count(ENV, "give a positive number of threads (or unset it to share the cores)")


def register() -> None:
    """Join the running processes (once per process) and set this process's threads."""
    fixed_threads()
    if _state["registered"] is None:
        folder = registry_folder()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{os.getpid()}.pid"
            path.touch()
        except OSError:  # a read-only cache: no sharing, torch's default count stays
            return
        _state["registered"] = path
        atexit.register(path.unlink, missing_ok=True)
    rebalance(force=True)


def unregister() -> None:
    """Leave the running processes (a worker between jobs), so the ones at work share the cores without it."""
    path = _state["registered"]
    if isinstance(path, Path):
        path.unlink(missing_ok=True)
        _state["registered"] = None


@contextlib.contextmanager
def standing_aside() -> Iterator[None]:
    """While a process only waits on its workers, it leaves the running processes, so that they share the cores
    without it; it joins again (and takes its share back) afterwards."""
    path = _state["registered"]
    if not isinstance(path, Path):
        yield
        return
    path.unlink(missing_ok=True)
    try:
        yield
    finally:
        try:
            path.touch()
        except OSError:
            pass
        rebalance(force=True)


def rebalance(force: bool = False) -> int:
    """Set torch's intra-op threads to this process's share (at most every RECHECK_SECONDS); returns it."""
    import torch

    now = time.monotonic()
    if not force and now - float(_state["checked"]) < RECHECK_SECONDS:
        return int(_state["threads"])
    _state["checked"] = now
    fixed = fixed_threads()
    if fixed is not None:
        threads = fixed
    elif _state["registered"] is None:
        return torch.get_num_threads()
    else:
        threads = share(cores_available(), live_processes())
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    _state["threads"] = threads
    return threads
