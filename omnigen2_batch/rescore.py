"""Deciding again over finished work: re-judging recorded scores when a recipe's thresholds
change, re-scoring a run with another CLIP (the `score` command), and bilingual parity.

The scorer measures and rules.py decides; this module brings the two to a finished run and
writes the outcome back through the store (which moves files between kept/ and rejected/).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from .images import load_rgb
from .jobs import Attempt, Job, JobResult
from .rules import decide, judge
from .scoring import scoring_refs
from .store import RunStore, StoredResult

if TYPE_CHECKING:
    from .scoring import ClipScorer


@dataclass(frozen=True)
class PairParity:
    """A row of the manifest's `pairs` table: EN vs ZH image similarity, text-score gap."""

    pair: str
    en_job: str
    zh_job: str
    similarity: float
    text_gap: float | None  # text score of the EN image minus the ZH one's; None if unscored


def mean(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# -- re-judging recorded scores (every run, before anything is generated) ------------------------
def redecide(store: RunStore, jobs: Iterable[Job]) -> tuple[int, dict[str, list[Attempt]]]:
    """Re-judge the plan's finished jobs with their current thresholds, from the scores on
    record: nothing is generated or scored. Returns (how many decisions changed, the attempts
    of jobs that were kept but now fail with attempts left: they climb on from there)."""
    by_id = {job.id: job for job in jobs}
    changed, resume = 0, {}
    for stored in store.finished(by_id):
        job = by_id[stored.job.id]
        if not any(a.scores for a in stored.attempts):
            continue  # made unscored (--no-score): nothing to judge
        verdicts = {a.n: judge(a.scores, job.scoring.thresholds) for a in stored.attempts
                    if a.scores}
        attempts = [a.to_attempt() for a in stored.attempts]
        for attempt in attempts:
            attempt.passed, attempt.failed_metrics = verdicts.get(attempt.n, (False, ()))
        at_hand = [i for i, a in enumerate(stored.attempts) if a.n == stored.best or a.image]
        status, best = decide(attempts, job.scoring.thresholds, made=at_hand)
        if stored.status == "kept" and status == "rejected" and _budget_left(job, attempts):
            attempts[best].image = store.kept_image(job.id)
            if attempts[best].image is not None:
                resume[job.id] = attempts
                continue
        if store.redecide(job, status, attempts[best].n, verdicts):
            changed += status != stored.status
    return changed, resume


def _budget_left(job: Job, attempts: list[Attempt]) -> bool:
    return sum(1 for a in attempts if not a.params.get("skipped")) < job.max_attempts


# -- bilingual parity ---------------------------------------------------------------------------
Pair = tuple[str, StoredResult, StoredResult]  # pair key, its EN job, its ZH job


def finished_pairs(results: Iterable[StoredResult]) -> list[Pair]:
    """The complete EN/ZH pairs among finished jobs, by pair key (sides by Job.pair_side)."""
    sides: dict[str, dict[str, StoredResult]] = {}
    for result in results:
        if result.job.scoring.pair and result.image:
            sides.setdefault(result.job.scoring.pair, {})[result.job.pair_side] = result
    return [(pair, s["en"], s["zh"]) for pair, s in sorted(sides.items()) if len(s) == 2]


def record_pairs(store: RunStore, scorer: "ClipScorer",
                 pairs: list[Pair] | None = None) -> list[PairParity]:
    """Compute and save the parity of `pairs` (default: every complete pair of the run's
    current jobs); the pairs table then holds exactly these rows."""
    pairs = finished_pairs(store.finished()) if pairs is None else pairs
    similarities = scorer.similarities([(load_rgb(store.run_dir / en.image),
                                         load_rgb(store.run_dir / zh.image))
                                        for _, en, zh in pairs]) if pairs else []
    rows = []
    for (pair, en, zh), similarity in zip(pairs, similarities):
        en_text, zh_text = _text_score(en), _text_score(zh)
        gap = None if en_text is None or zh_text is None else en_text - zh_text
        rows.append(PairParity(pair, en.job.id, zh.job.id, similarity, gap))
    store.replace_pairs([(p.pair, p.en_job, p.zh_job, p.similarity, p.text_gap) for p in rows])
    return rows


def _text_score(result: StoredResult) -> float | None:
    """The `text` score of the attempt that made the job's image."""
    made_by = result.attempt(result.best)
    return made_by.scores.get("text") if made_by else None


# -- re-scoring a finished run with a (possibly other) CLIP: the `score` command ----------------
def rescore_run(run_dir, scorer: "ClipScorer", chunk_size: int = 64) -> dict:
    """Re-score a run's kept and rejected images (and attempt images kept on disk) with
    `scorer`, re-decide with the jobs' current thresholds, and rewrite the results through
    RunStore.commit, which moves images between kept/ and rejected/ and rewrites PNG chunks.

    Attempts whose image is not on disk keep the scores of the run that made them and take no
    part in the decision; re-scored attempts carry params["rescored_with"].
    """
    summary = {"jobs": 0, "changed": [], "skipped": [], "clip_model": scorer.model_name,
               "pretrained": scorer.pretrained, "random_weights": scorer.random_weights}
    with RunStore.open(run_dir) as store:
        finished = store.finished()
        paths = {stored.job.id: stored.image for stored in finished}
        changed_files = {p.job_id: p for p in store.verify_files()}
        summary["skipped"] += [{"job": p.job_id, "error": f"{p.path} was {p.problem} since it "
                                "was made; `run` the recipe again to make it anew"}
                               for p in changed_files.values()]
        todo = [stored for stored in finished if stored.job.id not in changed_files]
        for start in range(0, len(todo), chunk_size):
            for stored, result in _rescore_chunk(store, todo[start:start + chunk_size],
                                                 paths, scorer, summary):
                job = stored.job
                paths[job.id] = store.image_path(job, result.status)  # dependants find moved anchors
                if result.status != stored.status:
                    summary["changed"].append({"job": job.id, "name": f"{job.section}/{job.name}",
                                               "from": stored.status, "to": result.status})
        pairs = record_pairs(store, scorer)
        counts = store.counts()["status"]
        store.set_meta("rescored", {"clip_model": scorer.model_name, "pretrained": scorer.pretrained})
    summary.update(kept=counts["kept"], rejected=counts["rejected"], pairs=[vars(p) for p in pairs],
                   similarity_mean=mean(p.similarity for p in pairs),
                   text_gap_mean=mean(p.text_gap for p in pairs))
    return summary


def _rescore_chunk(store: RunStore, chunk: list[StoredResult], paths: dict,
                   scorer: "ClipScorer", summary: dict):
    """Load, score (in one batch) and commit a chunk of jobs; yields (stored, new result)."""
    loaded = []
    for stored in chunk:
        try:
            loaded.append((stored, _load_result(store, stored),
                           _reference_images(store, stored.job, paths)))
        except (OSError, ValueError, KeyError) as err:
            summary["skipped"].append({"job": stored.job.id, "error": f"{type(err).__name__}: {err}"})
    items = [(stored.job, a) for stored, result, _ in loaded for a in result.attempts
             if a.image is not None]
    refs = {key: im for *_, images in loaded for key, im in images.items()}
    scores = scorer.score([(job, a.image) for job, a in items], refs)
    for (job, attempt), new in zip(items, scores):
        attempt.scores = new
        attempt.passed, attempt.failed_metrics = judge(new, job.scoring.thresholds)
        attempt.params = {**attempt.params, "scored": True,
                          "rescored_with": f"{scorer.model_name}:{scorer.pretrained or 'random'}"}
    for stored, result, _ in loaded:
        job = stored.job
        result.status, result.best = decide(result.attempts, job.scoring.thresholds)
        keep_attempts = any(a.image for a in stored.attempts)
        store.commit(job, result, keep_attempts=keep_attempts)
        summary["jobs"] += 1
        yield stored, result


def _load_result(store: RunStore, stored: StoredResult) -> JobResult:
    """The JobResult as recorded, with every image that is on disk."""
    attempts = [a.to_attempt() for a in stored.attempts]
    for attempt, record in zip(attempts, stored.attempts):
        if record.image and (store.run_dir / record.image).is_file():
            attempt.image = load_rgb(store.run_dir / record.image)
    best = next((i for i, a in enumerate(attempts) if a.n == stored.best), None)
    if best is None:
        raise ValueError(f"{store.run_dir / stored.image}: the manifest names attempt "
                         f"{stored.best} as its maker, but has no such attempt")
    if attempts[best].image is None:
        attempts[best].image = load_rgb(store.run_dir / stored.image)
    return JobResult(stored.job.id, stored.status, attempts, best)


def _reference_images(store: RunStore, job: Job, paths: dict) -> dict:
    """The scoring references and edit source of a job: files by path, anchors from the run."""
    images = {}
    for ref in scoring_refs(job):
        if ref.job_id:
            if ref.job_id not in paths:
                raise ValueError(f"reference job {ref.job_id} has no image in this run")
            images[ref.key] = load_rgb(store.run_dir / paths[ref.job_id])
        else:
            images[ref.key] = load_rgb(ref.path)
    return images
