"""The ladder's decisions, driven directly with given scores (the worker tests run it with CLIP)."""
import pytest
from PIL import Image

from omnigen2_batch.jobs import ImageRef, Job, Scoring
from omnigen2_batch.reflection import (
    IMAGE_GUIDANCE_CAP, TEXT_GUIDANCE_CAP, JobLadder, MissingImageError, attempt_seed)
from omnigen2_batch.rules import LADDER_STEPS, decide, rank

REF = ImageRef("sha256:" + "33" * 32, "/refs/hero.png")
SRC = ImageRef("sha256:" + "44" * 32, "/inputs/room.png")
IMAGES = {REF.key: Image.new("RGB", (32, 32), "red"), SRC.key: Image.new("RGB", (32, 32), "blue")}


def no_critique(image, prompt):
    return None


def run_ladder(job, scores_for, critique=no_critique, scored=True):
    """Drive a ladder to the end; scores_for(planned) gives each attempt's scores."""
    ladder = JobLadder(job, IMAGES, scored=scored)
    while not ladder.done:
        planned = ladder.next_round(critique)
        if planned:
            ladder.record_round([(p, Image.new("RGB", (16, 16), (p.n, 0, 0)), scores_for(p), 0.1)
                                 for p in planned])
    return ladder


def text_job(**kw):
    return Job("prompts", "p", "t2i", "a fox", scoring=Scoring(thresholds={"text": 0.5}), **kw)


def test_seeds_are_derived_deterministically():
    seeds = [attempt_seed(42, n) for n in range(20)]
    assert seeds[0] == 42
    assert len(set(seeds)) == 20
    assert seeds == [attempt_seed(42, n) for n in range(20)]
    assert attempt_seed(43, 1) != seeds[1]


def test_first_pass_stops_the_ladder():
    ladder = run_ladder(text_job(), lambda p: {"text": 0.6})
    assert [a.strategy for a in ladder.attempts] == ["initial"]
    assert ladder.status == "kept" and ladder.best == 0 and ladder.attempts[0].passed


def test_default_ladder_runs_then_cycles_until_the_budget_is_spent():
    job = text_job(max_attempts=6, text_guidance=4.0)
    values = {0: 0.10, 1: 0.30, 2: 0.20, 3: 0.35, 5: 0.05, 6: 0.00}  # n 4 is the skipped ask_mllm
    ladder = run_ladder(job, lambda p: {"text": values[p.n]})
    strategies = [a.strategy for a in ladder.attempts]
    assert strategies == ["initial", "new_seed", "stronger_guidance", "refine", "ask_mllm",
                          "new_seed", "stronger_guidance"]
    skipped = ladder.attempts[4]
    assert skipped.image is None and skipped.params["skipped"] and "ask_mllm" not in ladder.steps
    made = [a for a in ladder.attempts if a.image is not None]
    assert len(made) == job.max_attempts
    assert ladder.status == "rejected"
    assert ladder.best == 3  # the refine attempt had the highest text score
    assert made[2].params["text_guidance"] == pytest.approx(4.0 * 1.5)
    assert made[5].params["text_guidance"] == pytest.approx(min(4.0 * 1.5 ** 2, TEXT_GUIDANCE_CAP))
    refine = ladder.attempts[3]
    assert refine.params["prompt"] == "keep the composition; make it show: a fox"
    assert refine.params["base"] == 1  # the best attempt so far
    assert ladder.attempts[1].reason == "attempt 0 failed text=0.1000 < 0.5"
    assert len({a.seed for a in made}) == len(made)


def test_consistency_failure_raises_image_guidance_and_refines_with_references():
    job = Job("series/hero", "s1", "incontext", "the hero reads", inputs=(REF,), image_guidance=2.5,
              ladder=("stronger_guidance", "refine"), max_attempts=3,
              scoring=Scoring(references=(REF,), thresholds={"consistency_min": 0.9}))
    ladder = run_ladder(job, lambda p: {"text": 0.3, "consistency_min": 0.5})
    initial, stronger, refine = ladder.attempts
    assert stronger.params["image_guidance"] == IMAGE_GUIDANCE_CAP  # 2.5 * 1.5 capped
    assert stronger.params["text_guidance"] == job.text_guidance
    assert "match the reference's face and hair" in refine.params["prompt"]
    assert refine.params["n_images"] == 2  # the best attempt, then the reference
    assert ladder.status == "rejected"


def test_preservation_failure_refines_from_the_source():
    job = Job("edits", "e", "edit", "make the walls blue", inputs=(SRC,), ladder=("refine",), max_attempts=2,
              scoring=Scoring(source=SRC, thresholds={"preservation": 0.8}))
    ladder = run_ladder(job, lambda p: {"preservation": 0.95 if p.strategy == "refine" else 0.4})
    assert [a.strategy for a in ladder.attempts] == ["initial", "refine"]
    assert ladder.attempts[1].params["base"] == "source"
    assert ladder.attempts[1].params["prompt"].startswith("keep everything from the input image except")
    assert ladder.status == "kept" and ladder.best == 1


def test_ask_mllm_uses_the_critique_as_the_instruction():
    job = text_job(ladder=("ask_mllm",), max_attempts=2)
    seen = []

    def critique(image, prompt):
        seen.append(prompt)
        return "  make the fox orange  "

    ladder = run_ladder(job, lambda p: {"text": 0.1}, critique)
    assert [a.strategy for a in ladder.attempts] == ["initial", "ask_mllm"]
    assert ladder.attempts[1].params["prompt"] == "make the fox orange"
    assert seen == ["a fox"]


def test_ladder_of_only_skipped_steps_ends_rejected():
    ladder = run_ladder(text_job(ladder=("ask_mllm",), max_attempts=5), lambda p: {"text": 0.1})
    assert [a.strategy for a in ladder.attempts] == ["initial", "ask_mllm"]
    assert ladder.status == "rejected" and ladder.best == 0


def test_candidates_keep_the_best_passing():
    job = text_job(candidates=3, max_attempts=4)
    values = {0: 0.55, 1: 0.4, 2: 0.7}
    ladder = run_ladder(job, lambda p: {"text": values[p.n]})
    assert [a.strategy for a in ladder.attempts] == ["initial", "candidate", "candidate"]
    assert ladder.status == "kept" and ladder.best == 2


def test_unscored_keeps_the_first_attempt():
    ladder = run_ladder(text_job(candidates=3), lambda p: {}, scored=False)
    assert len(ladder.attempts) == 1 and ladder.status == "kept" and ladder.best == 0
    assert ladder.attempts[0].params["scored"] is False and ladder.attempts[0].scores == {}


def test_rank_and_decide_rule():
    thresholds = {"text": 0.25, "clipscore": 20}
    assert rank({"text": 0.5, "clipscore": 50.0}, thresholds) == pytest.approx((0.75 + 0.5) / 2)
    assert rank({"text": 0.5}, thresholds) == pytest.approx(0.75 / 2)  # a missing metric counts 0
    assert rank({"text": 0.2}, {}) == pytest.approx(0.6)  # no thresholds: all scored metrics


def test_decide_prefers_passing_over_higher_ranked_failing():
    ladder = run_ladder(text_job(candidates=2, max_attempts=2), lambda p: {"text": [0.1, 0.2][p.n]})
    attempts = ladder.attempts
    attempts[0].passed, attempts[1].passed = True, False
    assert decide(attempts, {"text": 0.5}) == ("kept", 0)


def test_bad_ladder_and_missing_images_are_refused():
    with pytest.raises(ValueError, match="unknown ladder step"):
        JobLadder(text_job(ladder=("new_seed", "pray")), IMAGES)
    job = Job("series/hero", "s", "incontext", "x", inputs=(ImageRef("job:abcd"),))
    with pytest.raises(MissingImageError, match="job:abcd"):
        JobLadder(job, IMAGES)
    assert set(LADDER_STEPS) == {"new_seed", "stronger_guidance", "refine", "ask_mllm"}
