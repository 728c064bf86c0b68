"""The worker loop with the real open_clip scorer (tiny config, random weights).

`GradientGenerator` below is a TEST DOUBLE FOR THE IMAGE MODEL ONLY: it renders a seeded colour
gradient per request, so many ladder scenarios run in milliseconds. The scorer is always the real
one; the last test drives the worker with the real tiny OmniGen2 pipeline generator.
"""
import json
import pickle
import zlib

import numpy as np
import pytest
from PIL import Image

from omnigen2_batch.jobs import ImageRef, Job, Scoring
from omnigen2_batch.config import ClipConfig, RunConfig
from omnigen2_batch.rules import rank
from omnigen2_batch.scoring import ClipScorer
from omnigen2_batch.worker import Worker

REF = ImageRef("sha256:" + "55" * 32, "/refs/hero.png")
IMAGES = {REF.key: Image.new("RGB", (48, 48), (200, 30, 30))}
SIZE = dict(width=64, height=64, steps=2)


class GradientGenerator:
    """Model stand-in (see the module docstring): a gradient from (seed, prompt, input pixels)."""

    def __init__(self, fail_prompts=(), critique_answer=None):
        self.batches: list[int] = []
        self.fail_prompts, self.critique_answer = set(fail_prompts), critique_answer

    def generate(self, requests):
        self.batches.append(len(requests))
        if self.fail_prompts & {r.prompt for r in requests}:
            raise RuntimeError("CUDA error: the model fell over")
        return [self._render(r) for r in requests]

    @staticmethod
    def _render(request):
        mix = zlib.crc32(request.prompt.encode()) ^ request.seed
        mix ^= sum(zlib.crc32(im.tobytes()) for im in request.images)
        corners = np.random.default_rng(mix).integers(0, 256, (2, 2, 3), dtype=np.uint8)
        return Image.fromarray(corners).resize((request.width, request.height), Image.BILINEAR)

    def critique(self, image, prompt):
        return self.critique_answer


@pytest.fixture
def scorer():
    """Fresh per test: the scorer caches text embeddings, and tests compare attempts' scores."""
    return ClipScorer("tiny-clip")


def job(name, threshold, **kw) -> Job:
    return Job("prompts", name, "t2i", f"a picture of {name}",
               scoring=Scoring(thresholds={"text": threshold}), **SIZE, **kw)


def test_passing_threshold_keeps_the_first_attempt(scorer):
    (result,) = Worker(GradientGenerator(), scorer).run([job("fox", -1)], {})
    assert result.status == "kept" and result.best == 0
    assert [a.strategy for a in result.attempts] == ["initial"]
    assert result.attempts[0].passed and set(result.attempts[0].scores) == {"text", "clipscore"}


def test_failing_threshold_walks_the_ladder_and_keeps_the_best_for_review(scorer):
    (result,) = Worker(GradientGenerator(), scorer).run([job("owl", 2, max_attempts=4)], {})
    assert [a.strategy for a in result.attempts] == ["initial", "new_seed", "stronger_guidance", "refine"]
    assert result.status == "rejected"
    ranks = [rank(a.scores, {"text": 2}) for a in result.attempts]
    assert result.best == ranks.index(max(ranks))
    assert result.image is result.attempts[result.best].image
    assert all(not a.passed and a.failed_metrics == ("text",) for a in result.attempts)
    assert all(a.seconds > 0 for a in result.attempts)


def test_ask_mllm_skipped_without_a_critique_and_used_with_one(scorer):
    ladder = ("ask_mllm", "new_seed")
    (silent,) = Worker(GradientGenerator(), scorer).run([job("cat", 2, ladder=ladder, max_attempts=2)], {})
    assert [a.strategy for a in silent.attempts] == ["initial", "ask_mllm", "new_seed"]
    assert silent.attempts[1].params["skipped"] and silent.attempts[1].image is None
    talking = GradientGenerator(critique_answer="make the cat bigger")
    (answered,) = Worker(talking, scorer).run([job("cat", 2, ladder=ladder, max_attempts=2)], {})
    assert [a.strategy for a in answered.attempts] == ["initial", "ask_mllm"]
    assert answered.attempts[1].params["prompt"] == "make the cat bigger"


def test_best_of_n_candidates(scorer):
    (result,) = Worker(GradientGenerator(), scorer).run([job("elk", -1, candidates=3)], {})
    assert [a.strategy for a in result.attempts] == ["initial", "candidate", "candidate"]
    assert len({a.seed for a in result.attempts}) == 3
    texts = [a.scores["text"] for a in result.attempts]
    assert result.status == "kept" and result.best == texts.index(max(texts))


def test_jobs_are_micro_batched_per_round(scorer):
    generator = GradientGenerator()
    jobs = [job("a", -1), job("b", 2, max_attempts=2), job("c", 2, max_attempts=3, candidates=2)]
    results = Worker(generator, scorer).run(jobs, {})
    assert generator.batches == [4, 2]  # round 1: 1 + 1 + 2 candidates; round 2: b and c retry
    assert [r.status for r in results] == ["kept", "rejected", "rejected"]
    assert [len(r.attempts) for r in results] == [1, 2, 3]


def test_a_failing_job_fails_alone(scorer):
    generator = GradientGenerator(fail_prompts={"a picture of bad"})
    missing = Job("series/hero", "lost", "incontext", "x", inputs=(ImageRef("job:feedbeef"),), **SIZE)
    results = Worker(generator, scorer).run([job("good", -1), job("bad", -1), missing], {})
    assert [r.status for r in results] == ["kept", "failed", "failed"]
    assert "model fell over" in results[1].error and results[1].best is None
    assert "job:feedbeef" in results[2].error


def test_unscored_run_keeps_the_first_attempt():
    (result,) = Worker(GradientGenerator(), None).run([job("yak", 2, candidates=3)], {})
    assert result.status == "kept" and len(result.attempts) == 1
    assert result.attempts[0].scores == {} and result.attempts[0].params["scored"] is False


def test_consistency_scored_against_references(scorer):
    series = Job("series/hero", "s1", "incontext", "the hero waves", inputs=(REF,), **SIZE,
                 scoring=Scoring(references=(REF,), thresholds={"consistency_min": 2}),
                 ladder=("stronger_guidance",), max_attempts=2)
    (result,) = Worker(GradientGenerator(), scorer).run([series], IMAGES)
    assert result.attempts[1].params["image_guidance"] > series.image_guidance
    assert all(-1 <= a.scores["consistency_min"] <= 1 for a in result.attempts)


# -- a contract every generator keeps ------------------------------------------------------------
@pytest.fixture(params=["gradient", "tiny-pipeline"])
def generator(request):
    """Each generator the worker may drive: the model stand-in and the real tiny pipeline."""
    if request.param == "gradient":
        return GradientGenerator()
    from omnigen2_batch.worker import build_worker

    return build_worker(RunConfig(model="tiny", device="cpu", score=False)).generator


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=int)


def assert_same_result(alone, batched) -> None:
    """Same decisions, attempts and images; a batched matrix product may round differently from
    a smaller one (one 8-bit level at most, as the pipeline tests pin), and only identical
    pixels must give identical scores."""
    assert (batched.status, batched.best, batched.error) == (alone.status, alone.best, alone.error)
    assert [(a.n, a.seed, a.strategy) for a in batched.attempts] == \
        [(a.n, a.seed, a.strategy) for a in alone.attempts]
    for a, b in zip(alone.attempts, batched.attempts, strict=True):
        assert (a.image is None) == (b.image is None)
        if a.image is None:
            continue
        diff = np.abs(pixels(a.image) - pixels(b.image))
        assert diff.max() <= 1
        if diff.max() == 0:
            assert b.scores.keys() == a.scores.keys()
            assert all(b.scores[m] == pytest.approx(v, abs=1e-3 if m == "clipscore" else 1e-5)
                       for m, v in a.scores.items())


def test_a_batch_of_jobs_gets_what_each_job_gets_alone(generator):
    series = Job("series/hero", "s1", "incontext", "the hero waves", inputs=(REF,), **SIZE,
                 scoring=Scoring(references=(REF,), thresholds={"consistency_min": 2}),
                 ladder=("stronger_guidance",), max_attempts=2)
    jobs = [job("fox", -1), job("owl", 2, max_attempts=3), job("elk", -1, candidates=2), series]
    together = Worker(generator, ClipScorer("tiny-clip")).run(jobs, IMAGES)
    for each, batched in zip(jobs, together, strict=True):
        (alone,) = Worker(generator, ClipScorer("tiny-clip")).run([each], IMAGES)
        assert_same_result(alone, batched)


def test_run_config_pickles_and_round_trips_through_json():
    config = RunConfig(model="tiny", clip=ClipConfig("tiny-clip", None), executor="ray")
    assert pickle.loads(pickle.dumps(config)) == config  # Ray ships it to every actor
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_real_tiny_pipeline_through_the_ladder():
    from omnigen2_batch.worker import build_worker

    worker = build_worker(RunConfig(model="tiny", device="cpu", clip=ClipConfig("tiny-clip", None)))
    jobs = [job("fox", -1, max_attempts=2), job("owl", 2, max_attempts=3)]
    first, second = worker.run(jobs, {})
    assert first.status == "kept" and len(first.attempts) == 1
    assert second.status == "rejected"
    assert [a.strategy for a in second.attempts] == ["initial", "new_seed", "stronger_guidance"]
    assert all(a.image.size == (64, 64) for a in first.attempts + second.attempts)
