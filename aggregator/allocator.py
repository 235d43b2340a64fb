"""Running the aggregator on mimalloc, so that the memory a load used goes back.

CPython's small-object allocator (pymalloc) carves 1 MiB arenas and returns one
to the OS only when every object in it has been freed. Nearly all of a file's
memory in the index is such small objects, so a load (200 watchers come, churn
and leave) spreads over dozens of new arenas, and after it a handful of objects
allocated meanwhile and still alive (a metric's latest value, a timer, a
peer's address) are enough to pin every one of them: in the soak about 20 MiB
stayed resident for good, whatever the garbage collector or `malloc_trim` did.

mimalloc (the allocator CPython 3.13 adopted) manages 64 KiB pages and gives
back each one a second after it emptied (see `MIMALLOC_OPTIONS`), from inside
its own calls: the memory trimmer calls `mi_collect` every second, so that an
idle aggregator does too, and with `force` after the index shrank.

So `python -m aggregator` re-executes itself once, before it serves anything,
with `PYTHONMALLOC=malloc` (every Python object from the C allocator) and the
mimalloc of the `cmeel-mimalloc` wheel preloaded. `exec` keeps the PID. Where
that library is missing, or with `--allocator pymalloc`, it runs as it is.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys
from collections.abc import Callable, Mapping
from typing import cast

ALLOCATORS = ("mimalloc", "pymalloc")

MIMALLOC_OPTIONS = {
    # Transparent huge pages make every touched 2 MiB resident, and unpurgeable.
    "MIMALLOC_ALLOW_THP": "0",
    # A page goes back a second after it emptied (mimalloc's default): work
    # that comes back within the second reuses it instead of faulting it in
    # again. 0 made `/files/` reads 2-4x slower, 100 ms the lag of a change
    # 1-2 ms longer; the price is a higher peak under churn (about +30 MiB).
    "MIMALLOC_PURGE_DELAY": "1000",
}


def mimalloc_library() -> str | None:
    """The path of the libmimalloc.so that the cmeel-mimalloc wheel installs, if it is."""
    try:
        dist = importlib.metadata.distribution("cmeel-mimalloc")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == "libmimalloc.so":
            path = str(dist.locate_file(file))
            return path if os.path.exists(path) else None
    return None


def mimalloc_active() -> bool:
    """True when this process's Python objects and C buffers all come from mimalloc."""
    preloaded = hasattr(ctypes.CDLL(None), "mi_version")
    return preloaded and os.environ.get("PYTHONMALLOC") == "malloc"


def mimalloc_collector() -> Callable[[bool], None] | None:
    """mimalloc's `mi_collect(force)`, if mimalloc is in use.

    It gives back the free pages whose purge delay has passed, or all of them
    with `force`. Call it on the thread that freed the memory (the event
    loop's): each thread has a heap of its own.
    """
    if not mimalloc_active():
        return None
    collect = ctypes.CDLL(None).mi_collect
    collect.argtypes, collect.restype = [ctypes.c_bool], None
    return cast("Callable[[bool], None]", collect)


def mimalloc_environment(library: str, env: Mapping[str, str]) -> dict[str, str]:
    """`env` with mimalloc preloaded for every allocation; options set in `env` win."""
    out = {**MIMALLOC_OPTIONS, **env}
    out["PYTHONMALLOC"] = "malloc"
    out["LD_PRELOAD"] = " ".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
    return out


def exec_with_mimalloc() -> str:
    """Re-execute this command on mimalloc (does not return), or say why not.

    Call it first thing, from `__main__` only: the process image is replaced.
    Returns "" when mimalloc is already in use.
    """
    if mimalloc_active():
        return ""
    library = mimalloc_library()
    if library is None:
        return "the cmeel-mimalloc package is not installed"
    if library in os.environ.get("LD_PRELOAD", ""):
        return f"{library} was preloaded and is not in use"  # never exec in a loop
    env = mimalloc_environment(library, os.environ)
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)  # noqa: S606
    except OSError as err:
        return f"cannot re-execute {sys.executable}: {err}"
    raise AssertionError("unreachable: execve returned")  # pragma: no cover
