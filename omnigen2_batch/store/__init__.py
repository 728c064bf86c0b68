"""The run directory: images on disk plus the SQLite manifest that says what each one is.

No torch here: `status` and `report` read the manifest through this package in well under a
second. Modules: core (RunStore), upkeep (keeping the dir true to the current recipe), files
(safe paths and atomic writes), manifest (opening SQLite, refusing damage), png (text chunks).
"""
from .core import FINAL, LIVE, RECIPE_FILE, SUPERSEDED
from .errors import (ManifestDamaged, NotARunDir, NotWritable, OtherRecipe, RunLocked, StoreError,
                     StoreFull, UnsafePath)
from .files import DISK_FULL, LOCK_FILE, SET_ASIDE, TEMP_PREFIX
from .manifest import MANIFEST
from .png import TINY_NOTE, a1111_parameters, encode_png, is_tiny
from .upkeep import FileProblem, RunStore, StoredAttempt, StoredResult

__all__ = [
    "DISK_FULL", "FINAL", "LIVE", "LOCK_FILE", "MANIFEST", "RECIPE_FILE", "SET_ASIDE", "SUPERSEDED",
    "TEMP_PREFIX", "TINY_NOTE", "FileProblem", "ManifestDamaged", "NotARunDir", "NotWritable",
    "OtherRecipe", "RunLocked", "RunStore", "StoreError", "StoreFull", "StoredAttempt",
    "StoredResult", "UnsafePath", "a1111_parameters", "encode_png", "is_tiny",
]
