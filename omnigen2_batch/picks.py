"""`pick RUN_DIR IMAGE...`: mark favourite kept images in the manifest, for `export --picked`.

An IMAGE is a kept file (its path, absolute or relative to the run dir or the current folder)
or a job id (its first 8 or more characters) with an optional variant: `3f2a9c01`, `3f2a9c01:v2`.
Picks accumulate in the meta key "picks" (store/variants.py); `--clear` forgets them first.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .errors import UserError
from .store import RunStore
from .store.variants import PICKS, parse_pick, pick_key, ranking_of

JOB_REF = re.compile(r"(?P<id>[0-9a-f]{8,16})(?::v?(?P<rank>\d+))?")


def pick_images(run_dir: str | os.PathLike, images: list[str], clear: bool = False) -> list[str]:
    """Add the given images to the run's picks; returns every pick afterwards. UserError (and
    nothing written) when an IMAGE names no kept image of this run."""
    with RunStore.open(run_dir) as store:
        kept = kept_images(store)
        chosen = [resolve(image, kept, store.run_dir) for image in images]
        picks = [] if clear else json.loads(store.get_meta(PICKS) or "[]")
        picks = list(dict.fromkeys(picks + chosen))
        store.set_meta(PICKS, json.dumps(picks))
    return picks


def kept_images(store: RunStore) -> dict[str, str]:
    """Pick key ("<id>" or "<id>:v<rank>") -> the kept file, for every kept image."""
    found = {}
    for row in store.jobs():
        if row["status"] != "kept" or not row["image"]:
            continue
        found[pick_key(row["id"], 1)] = row["image"]
        for variant in ranking_of(row.get("variants")):
            found[pick_key(row["id"], variant["rank"])] = variant["image"]
    return found


def resolve(image: str, kept: dict[str, str], run_dir: Path) -> str:
    """The pick key an IMAGE argument names."""
    by_file = {Path(rel).as_posix(): key for key, rel in kept.items()}
    for candidate in (Path(image), run_dir / image):
        try:
            rel = candidate.resolve().relative_to(run_dir).as_posix()
        except (ValueError, OSError):
            continue
        if rel in by_file:
            return by_file[rel]
    match = JOB_REF.fullmatch(image.strip())
    if match:
        rank = int(match["rank"] or 1)
        keys = [key for key in kept
                if key.startswith(match["id"]) and parse_pick(key)[1] == rank]
        if len(keys) == 1:
            return keys[0]
        if len(keys) > 1:
            raise UserError(f"{image}: matches {len(keys)} kept images; give more of the job id")
    raise UserError(f"{image}: not a kept image of {run_dir} (give a file under kept/, or a job "
                    "id of 8+ characters with an optional variant, like 3f2a9c01:v2)")
