"""The filewatch watcher: watches one folder and reports it to the aggregator."""

from watcher.config import WatcherConfig
from watcher.scanner import FileStat, scan_folder
from watcher.state import Batch, Change, FolderState, Op

__all__ = ["Batch", "Change", "FileStat", "FolderState", "Op", "WatcherConfig", "scan_folder"]
