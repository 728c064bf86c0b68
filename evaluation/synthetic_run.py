"""Synthetic run directories for the report benchmark and tests: no model, no scorer.

Results go through the real `RunStore` (so files, PNG chunks and manifest rows are exactly what a
run writes), but the images are small PIL drawings and the scores are made up, so a run of every
section kind (or of 10,000 jobs) exists in moments.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from omnigen2_batch.jobs import Attempt, ImageRef, Job, JobResult, Scoring
from omnigen2_batch.store import RunStore

XSS_PROMPT = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> & co'
TEXT_MIN = {"text": 0.25}


def swatch(seed: int, size: int = 64) -> Image.Image:
    """A small, distinct RGB picture (a colour field with a box), so thumbnails differ."""
    rng = random.Random(seed)
    colour = tuple(rng.randrange(256) for _ in range(3))
    image = Image.new("RGB", (size, size), colour)
    x, y = rng.randrange(size // 2), rng.randrange(size // 2)
    ImageDraw.Draw(image).rectangle((x, y, x + size // 3, y + size // 3), fill=(255 - colour[0], 40, 200))
    return image


def attempt(n: int, scores: dict[str, float], passed: bool, strategy: str = "initial",
            failed: tuple[str, ...] = (), size: int = 64) -> Attempt:
    reason = "first attempt" if n == 0 else "previous attempt failed: " + ", ".join(failed or ("text",))
    return Attempt(n=n, seed=100 + n, strategy=strategy, reason=reason,
                   params={"text_guidance": 5.0 + n}, scores=scores, passed=passed,
                   failed_metrics=failed, seconds=1.5 + n, image=swatch(hash((n, *scores.values())), size))


def kept(store: RunStore, job: Job, scores: dict[str, float], size: int = 64) -> Job:
    store.commit(job, JobResult(job.id, "kept", [attempt(0, scores, True, size=size)], best=0))
    return job


def rejected(store: RunStore, job: Job, text_scores: list[float], best: int, size: int = 64) -> Job:
    """A job that failed `text` on every rung of the ladder; `best` is the attempt kept for review."""
    strategies = ("initial", "new_seed", "stronger_guidance", "refine")
    attempts = [attempt(n, {"text": score}, False, strategies[n], ("text",), size)
                for n, score in enumerate(text_scores)]
    store.commit(job, JobResult(job.id, "rejected", attempts, best=best), keep_attempts=True)
    return job


def open_run(root: Path, recipe_name: str, model: str = "tiny") -> RunStore:
    store = RunStore.open(root)
    store.set_meta("recipe_name", recipe_name)
    store.set_meta("model", model)
    store.set_meta("config", json.dumps({"model": model, "keep_attempts": True}))
    return store


def write_mixed_run(root: Path, ref_dir: Path, model: str = "tiny") -> Path:
    """A run with every section kind: kept, rejected (3 attempts), failed and pending prompts, a
    character series (a file reference + a generated anchor), edits, and two bilingual pairs (one
    with a pairs row, one without)."""
    ref_dir.mkdir(parents=True, exist_ok=True)
    ref_path = ref_dir / "hero ref #1.png"
    swatch(999, 96).save(ref_path)
    ref = ImageRef(key="sha256:" + "ab" * 32, path=str(ref_path))
    with open_run(root, "mixed <sections>", model) as store:
        prompts = ["a red fox in snow", XSS_PROMPT, "a lighthouse at dusk"]
        jobs = [Job("prompts", f"p{i}", "t2i", p, model=model, scoring=Scoring(text=p, thresholds=TEXT_MIN))
                for i, p in enumerate(prompts)]
        hard = Job("prompts", "hard", "t2i", "a clock showing 4:35", model=model,
                   scoring=Scoring(thresholds=TEXT_MIN))
        broken = Job("prompts", "broken", "t2i", "a prompt that crashed", model=model)
        later = Job("prompts", "later", "t2i", "not generated yet", model=model)
        store.add_jobs([*jobs, hard, broken, later])
        for i, job in enumerate(jobs):
            kept(store, job, {"text": 0.3 + i / 100, "clipscore": 30.0 + i})
        rejected(store, hard, [0.12, 0.21, 0.18], best=1)
        store.commit(broken, JobResult(broken.id, "failed", error="RuntimeError: out of memory <2 GiB>"))

        anchor = kept(store, Job("series/hero", "anchor", "t2i", "portrait of the hero", model=model),
                      {"text": 0.33})
        refs = (ref, ImageRef(key=f"job:{anchor.id}"))
        for i, shot in enumerate(["hero rides a bike", "hero reads a book"]):
            kept(store, Job("series/hero", f"shot{i}", "incontext", shot, inputs=refs, model=model,
                            scoring=Scoring(text=shot, references=refs, thresholds={"subject": 0.6})),
                 {"text": 0.3, "subject": 0.7 + i / 10})

        for i, instruction in enumerate(["make it winter", "add a hat"]):
            kept(store, Job("edits", f"e{i}", "edit", instruction, inputs=(ref,), model=model,
                            scoring=Scoring(text=instruction, source=ref, thresholds={"preserve": 0.5})),
                 {"text": 0.28, "preserve": 0.8})

        for i, (en_text, zh_text) in enumerate([("a cat on a roof", "屋顶上的猫"), ("a red kite", "红色的风筝")]):
            key = f"pair{i}"
            en = kept(store, Job("bilingual/节日", f"{key}-en", "t2i", en_text, lang="en", model=model,
                                 scoring=Scoring(text=en_text, pair=key)), {"text": 0.31})
            zh = kept(store, Job("bilingual/节日", f"{key}-中文", "t2i", zh_text, lang="zh", model=model,
                                 scoring=Scoring(text=en_text, pair=key)), {"text": 0.24 + i / 100})
            if i == 0:
                store.save_pair(key, en.id, zh.id, similarity=0.82, text_gap=0.07)
    return root


def write_bulk_run(root: Path, n_jobs: int, sections: int = 4, size: int = 32) -> Path:
    """`n_jobs` prompt jobs over `sections` sections: ~85% kept, 10% rejected (3 attempts), 5% failed."""
    rng = random.Random(0)
    with open_run(root, "bulk") as store:
        for i in range(n_jobs):
            job = Job(f"section{i % sections}", f"job{i:05d}", "t2i", f"prompt {i}: a scene with {i % 97} birds",
                      seed=i, model="tiny", scoring=Scoring(thresholds=TEXT_MIN))
            roll = rng.random()
            if roll < 0.85:
                kept(store, job, {"text": 0.25 + rng.random() / 5}, size)
            elif roll < 0.95:
                rejected(store, job, [rng.random() / 4 for _ in range(3)], best=0, size=size)
            else:
                store.commit(job, JobResult(job.id, "failed", error=f"ValueError: job {i} failed"))
    return root
