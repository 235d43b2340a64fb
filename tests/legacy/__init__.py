"""Tests of the legacy HTTP protocol: the original Go watcher's hello/bye/PATCH."""
