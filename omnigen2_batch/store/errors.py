"""What can go wrong with a run directory. Every message says which path and what to do.

`exit_code` is what the CLI should exit with: 2 when the person must act on the run directory
(wrong folder, damaged manifest, a link, a lock), 3 when the disk is full, 1 otherwise.
"""
from ..errors import EXIT_INCOMPLETE, EXIT_UNAVAILABLE, EXIT_USER, BatchError


class StoreError(BatchError):
    """The run directory cannot be used; the message says why and what to do."""

    exit_code = EXIT_INCOMPLETE


class NotARunDir(StoreError):
    """--out names a folder that holds something else: it is never written into."""

    exit_code = EXIT_USER


class OtherRecipe(StoreError):
    """The run directory belongs to another recipe: one run directory holds one recipe."""

    exit_code = EXIT_USER


class ManifestDamaged(StoreError):
    """manifest.sqlite is empty, truncated or not a SQLite database of ours."""

    exit_code = EXIT_USER


class UnsafePath(StoreError):
    """A path inside the run directory is a symbolic link (or not what the layout expects)."""

    exit_code = EXIT_USER


class NotWritable(StoreError):
    """The run directory (or a folder in it) cannot be created or written: permissions, read-only."""

    exit_code = EXIT_USER


class RunLocked(StoreError):
    """Another process is writing to the run directory."""

    exit_code = EXIT_USER


class StoreFull(StoreError):
    """The disk filled up while writing; nothing partial was left behind."""

    exit_code = EXIT_UNAVAILABLE
