"""Where the aggregator's memory per file goes: tracemalloc over its own index code.

    python bench/memprofile.py [FILES]

Builds, in this process, what an aggregator builds for one watcher's snapshot
(the gRPC adapter's conversion, the index, the store, then the cached /files/
bodies, plain and gzip) and prints, as JSON, the bytes still allocated per
source line, per file. tracemalloc sees Python allocations only: the RSS
measured by the memory scenario also holds allocator overhead and freed
memory not given back to the system.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import gc  # noqa: E402
import json  # noqa: E402
import tracemalloc  # noqa: E402
from typing import Any  # noqa: E402

TOP = 15


def _top(
    after: tracemalloc.Snapshot, before: tracemalloc.Snapshot, files: int
) -> tuple[int, list[list[Any]]]:
    stats = after.compare_to(before, "lineno")
    total = sum(s.size_diff for s in stats)
    rows = [
        [
            f"{Path(s.traceback[0].filename).name}:{s.traceback[0].lineno}",
            s.size_diff,
            round(s.size_diff / files, 1),
            round(100 * s.size_diff / total, 1) if total else 0.0,
        ]
        for s in sorted(stats, key=lambda s: -s.size_diff)[:TOP]
    ]
    return total, rows


def profile(files: int) -> dict[str, Any]:
    """Bytes per file by allocation site: index + store, then the cached bodies."""
    from aggregator.grpc_sync import files_from_pb  # noqa: PLC0415 (after the path fix)
    from aggregator.http_gateway import FilesBodies  # noqa: PLC0415
    from aggregator.index import Index  # noqa: PLC0415
    from aggregator.store import Store  # noqa: PLC0415
    from aggregator.telemetry import Metrics  # noqa: PLC0415
    from bench.synthetic import prepared_snapshot  # noqa: PLC0415
    from gen import filewatch_pb2 as pb  # noqa: PLC0415

    messages = [pb.WatcherMessage.FromString(m) for m in prepared_snapshot(files)]
    index = Index()
    store = Store(index, Metrics())
    gc.collect()
    tracemalloc.start(1)
    empty = tracemalloc.take_snapshot()
    index.begin_snapshot("memprofile", "epoch")
    for msg in messages:
        if msg.WhichOneof("kind") == "snapshot_chunk":
            index.extend_snapshot("memprofile", files_from_pb(msg.snapshot_chunk))
    store.commit_snapshot("memprofile", 0, "new_instance")
    del messages
    gc.collect()
    loaded = tracemalloc.take_snapshot()
    bodies = FilesBodies(index)
    FilesBodies.gzipped(bodies.get(False))
    gc.collect()
    served = tracemalloc.take_snapshot()
    tracemalloc.stop()
    index_total, index_top = _top(loaded, empty, files)
    bodies_total, bodies_top = _top(served, loaded, files)
    return {
        "kind": "tracemalloc",
        "files": files,
        "index_bytes_per_file": index_total / files,
        "index_top": index_top,
        "bodies_bytes_per_file": bodies_total / files,
        "bodies_top": bodies_top,
    }


def main() -> int:
    """Print the profile as JSON."""
    files = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    print(json.dumps(profile(files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
