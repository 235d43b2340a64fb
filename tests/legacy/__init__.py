"""Tests of the legacy HTTP protocol (SPEC 5): the original Go watcher's hello/bye/PATCH."""
