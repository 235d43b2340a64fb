"""Churn generator: creates, modifies and deletes files in several folders at a fixed rate.

Runs as its own process (`python bench/churn_gen.py ...`) so that its work
never holds the measuring process's GIL. Each folder starts with SEED files,
half named seed-f-N (created, not yet modified) and half seed-m-N (modified,
not yet deleted), made by the caller before its watcher starts. Every
operation is, round robin per folder: create a new empty file, append to the
oldest unmodified one, delete the oldest modified one; so each name sees at
most one create, one modify and one delete, seconds apart, and the folder
keeps its size. Each operation is logged as `monotonic_ns op folder name`
(op c, m or d; the time is taken just before the system call), written to
--out at the end, with a JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import sys
import time


def main() -> int:
    """Generate churn; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="operation log to write")
    parser.add_argument("--rate", type=float, required=True, help="operations/s per folder")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--seed", type=int, required=True, help="files per folder at the start")
    parser.add_argument("folders", nargs="+")
    ns = parser.parse_args()
    folders = [os.fsencode(f) for f in ns.folders]
    fresh = [collections.deque(f"seed-f-{j:05d}" for j in range(ns.seed // 2)) for _ in folders]
    modified = [
        collections.deque(f"seed-m-{j:05d}" for j in range(ns.seed - ns.seed // 2)) for _ in folders
    ]
    done = [0] * len(folders)
    log: list[tuple[int, str, int, str]] = []
    serial = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    start = time.monotonic()
    end = start + ns.seconds
    max_behind = 0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = int((now - start) * ns.rate)
        for _ in range(10_000):  # bounded catch-up passes, never past the end
            if time.monotonic() >= end:
                break
            progressed = False
            for i, folder in enumerate(folders):
                if done[i] >= due:
                    continue
                max_behind = max(max_behind, due - done[i])
                kind = done[i] % 3
                if kind == 1 and fresh[i]:
                    name = fresh[i].popleft()
                    t = time.monotonic_ns()
                    fd = os.open(os.path.join(folder, name.encode()), os.O_WRONLY | os.O_APPEND)
                    os.write(fd, b"x")
                    os.close(fd)
                    modified[i].append(name)
                    log.append((t, "m", i, name))
                elif kind == 2 and modified[i]:
                    name = modified[i].popleft()
                    t = time.monotonic_ns()
                    os.unlink(os.path.join(folder, name.encode()))
                    log.append((t, "d", i, name))
                else:
                    name = f"c{serial:08d}"
                    serial += 1
                    t = time.monotonic_ns()
                    os.close(os.open(os.path.join(folder, name.encode()), flags, 0o644))
                    fresh[i].append(name)
                    log.append((t, "c", i, name))
                done[i] += 1
                progressed = True
            if not progressed:
                break
        time.sleep(0.001)
    elapsed = time.monotonic() - start
    with open(ns.out, "w") as out:
        out.writelines(f"{t} {op} {i} {name}\n" for t, op, i, name in log)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    summary = {
        "ops": len(log),
        "seconds": elapsed,
        "max_behind": max_behind,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
