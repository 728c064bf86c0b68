"""ClipScorer with the real open_clip code on the tiny config (random weights, seeded)."""
import json
import logging

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from omnigen2_batch.cli import main
from omnigen2_batch.jobs import Attempt, ImageRef, Job, JobResult, Scoring
from omnigen2_batch.rescore import record_pairs
from omnigen2_batch.rules import METRICS, judge, rank
from omnigen2_batch.scoring import ClipScorer, ScorerError, alignment_text
from omnigen2_batch.store import RunStore

REF = ImageRef("sha256:" + "11" * 32, "/refs/hero.png")
SRC = ImageRef("sha256:" + "22" * 32, "/inputs/room.png")


def noise(seed: int, size=(48, 40)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


# Absolute tolerances on each metric's own scale: cosines live in [-1, 1]; clipscore is 100 * cos,
# so float32 rounding that moves a cosine by 1e-7 moves clipscore by 1e-5.
COSINE_TOL = 1e-5
TOLERANCE = {metric: 100 * COSINE_TOL if metric == "clipscore" else COSINE_TOL for metric in METRICS}


@pytest.fixture
def scorer() -> ClipScorer:
    """A fresh scorer per test (18 ms once open_clip is warm): its embedding cache is state, and a
    cached text embedded in another test's batch may round differently from a fresh one."""
    return ClipScorer("tiny-clip")


def assert_same_scores(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for metric, value in expected.items():
        assert actual[metric] == pytest.approx(value, abs=TOLERANCE[metric]), metric


def series_job(prompt="a knight in a forest") -> Job:
    return Job("series/hero", "shot", "incontext", prompt, inputs=(REF,), scoring=Scoring(references=(REF,)))


def edit_job() -> Job:
    return Job("edits", "e", "edit", "make the walls blue", inputs=(SRC,),
               scoring=Scoring(source=SRC, source_caption="a white room", target_caption="a blue room"))


def test_consistency_with_itself_is_the_maximum(scorer):
    ref = noise(1)
    images = {REF.key: ref}
    own, other = scorer.score([(series_job(), ref), (series_job(), noise(2))], images)
    assert own["consistency_mean"] == pytest.approx(1.0, abs=COSINE_TOL)
    assert own["consistency_min"] == pytest.approx(1.0, abs=COSINE_TOL)
    assert other["consistency_mean"] < own["consistency_mean"]


def test_edit_metrics_preservation_and_direction(scorer):
    src, out = noise(3), noise(4)
    job = edit_job()
    (unchanged,), (edited,) = scorer.score([(job, src)], {SRC.key: src}), scorer.score([(job, out)], {SRC.key: src})
    assert unchanged["preservation"] == pytest.approx(1.0, abs=COSINE_TOL)
    assert unchanged["direction"] == 0.0  # no change: the image delta is zero
    img = scorer.embed_images([out, src])
    txt = scorer.embed_texts(["a blue room", "a white room"])
    expected = torch.nn.functional.cosine_similarity(img[0] - img[1], txt[0] - txt[1], dim=0)
    assert edited["direction"] == pytest.approx(float(expected), abs=COSINE_TOL)
    assert set(edited) == {"text", "clipscore", "preservation", "direction"}


def test_clipscore_is_the_clamped_scaled_text_cosine(scorer):
    for scores in scorer.score([(series_job(p), noise(i)) for i, p in enumerate(["a", "b", "c d"])],
                               {REF.key: noise(9)}):
        assert scores["clipscore"] == pytest.approx(100 * max(scores["text"], 0.0))
        assert set(scores) <= set(METRICS)


def test_same_seed_same_scores_and_seed_matters():
    job, images = series_job(), {REF.key: noise(5)}
    a = ClipScorer("tiny-clip", seed=3).score([(job, noise(6))], images)
    b = ClipScorer("tiny-clip", seed=3).score([(job, noise(6))], images)
    c = ClipScorer("tiny-clip", seed=4).score([(job, noise(6))], images)
    assert a == b
    assert a != c


def test_batched_equals_one_by_one(scorer):
    images = {REF.key: noise(10), SRC.key: noise(11)}
    items = [(series_job("a red cape"), noise(12)), (edit_job(), noise(13)),
             (series_job("一位骑士"), noise(14, (64, 64))), (edit_job(), noise(15))]
    one_by_one = ClipScorer("tiny-clip", batch_size=1)
    together = scorer.score(items, images)
    for item, scores in zip(items, together, strict=True):
        assert_same_scores(one_by_one.score([item], images)[0], scores)


def test_reference_is_embedded_once_per_scorer():
    scorer = ClipScorer("tiny-clip", seed=1)
    images = {REF.key: noise(20)}
    embedded = []
    original = scorer.embed_images
    scorer.embed_images = lambda ims: embedded.append(len(ims)) or original(ims)
    scorer.score([(series_job(), noise(21))], images)
    scorer.score([(series_job(), noise(22)), (series_job(), noise(23))], images)
    assert embedded == [1, 1, 2]  # outputs + the reference, then only the two new outputs


def test_chinese_prompt_scored_against_english_twin_unless_multilingual(scorer):
    job = Job("bilingual", "zh", "t2i", "一只红色的狐狸", lang="zh", scoring=Scoring(text="a red fox"))
    assert alignment_text(job, multilingual=False) == "a red fox"
    assert alignment_text(job, multilingual=True) == "一只红色的狐狸"
    image = noise(30)
    (scores,) = scorer.score([(job, image)], {})
    expected = float(scorer.embed_images([image])[0] @ scorer.embed_texts(["a red fox"])[0])
    assert scores["text"] == pytest.approx(expected, abs=COSINE_TOL)


def test_judge():
    assert judge({"text": 0.3}, {"text": 0.25}) == (True, ())
    assert judge({"text": 0.2, "clipscore": 20.0}, {"text": 0.25, "clipscore": 10}) == (False, ("text",))
    assert judge({"text": 0.9}, {"consistency_min": 0.5}) == (False, ("consistency_min",))
    assert judge({}, {}) == (True, ())
    with pytest.raises(ValueError, match="consistency"):
        judge({"text": 0.3}, {"consistancy": 0.5})


def test_similarities_of_image_pairs(scorer):
    same, other = noise(40), noise(41)
    identical, different = scorer.similarities([(same, same), (same, other)])
    assert identical == pytest.approx(1.0, abs=COSINE_TOL) and different < identical


def test_record_pairs_pairs_en_with_zh_and_replaces_old_rows(scorer, tmp_path):
    en = Job("bilingual", "en", "t2i", "a red fox", scoring=Scoring(pair="fox"))
    zh = Job("bilingual", "zh", "t2i", "一只红狐狸", lang="zh", scoring=Scoring(text="a red fox", pair="fox"))
    lone = Job("bilingual", "owl-zh", "t2i", "猫头鹰", lang="zh", scoring=Scoring(pair="owl"))
    with RunStore.open(tmp_path / "run") as store:
        for seed, (job, text) in enumerate([(zh, 0.2), (en, 0.3), (lone, 0.1)]):
            attempt = Attempt(0, seed, "initial", "", {}, {"text": text}, True, image=noise(seed))
            store.commit(job, JobResult(job.id, "kept", [attempt], best=0))
        store.save_pair("fox", "stale-en", "stale-zh", 0.5, 0.0)
        (fox,) = record_pairs(store, scorer)
        assert (fox.pair, fox.en_job, fox.zh_job) == ("fox", en.id, zh.id)
        assert fox.text_gap == pytest.approx(0.1) and -1.0 <= fox.similarity <= 1.0
        assert [(p["pair"], p["en_job"]) for p in store.pairs()] == [("fox", en.id)]


def test_random_weights_warn_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="omnigen2_batch.scoring"):
        scorer = ClipScorer("tiny-clip")
    assert scorer.random_weights
    assert "RANDOM weights" in caplog.text


def test_local_weights_file_is_loaded(tmp_path):
    trained = ClipScorer("tiny-clip", seed=7)
    path = tmp_path / "tiny.pt"
    torch.save(trained.model.state_dict(), path)
    loaded = ClipScorer("tiny-clip", pretrained=str(path), seed=99)
    assert not loaded.random_weights
    job, image = series_job(), noise(50)
    assert loaded.score([(job, image)], {REF.key: noise(51)}) == trained.score([(job, image)], {REF.key: noise(51)})


def test_unknown_weights_name_what_to_do():
    with pytest.raises(ScorerError, match="a weights file of that model"):
        ClipScorer("tiny-clip", pretrained="no-such-tag")


# -- the `score` command: re-scoring a run directory ------------------------------------------
def unscored_attempt(n: int, image: Image.Image) -> Attempt:
    return Attempt(n, 100 + n, "initial" if n == 0 else "new_seed", "first attempt",
                   {"scored": False}, image=image)


def write_unscored_run(root, keep_attempts_job: Job):
    """A run made with --no-score: every job kept, nothing scored. One job kept 3 attempt images."""
    jobs = [
        Job("prompts", "easy", "t2i", "a fox", scoring=Scoring(thresholds={"text": -1})),
        Job("prompts", "hard", "t2i", "a clock", scoring=Scoring(thresholds={"text": 2})),
        Job("bilingual", "fox-en", "t2i", "a red fox", lang="en", scoring=Scoring(pair="fox")),
        Job("bilingual", "fox-zh", "t2i", "一只红狐狸", lang="zh", scoring=Scoring(text="a red fox", pair="fox")),
    ]
    with RunStore.open(root) as store:
        store.set_meta("config", {"clip": {"model": "tiny-clip", "pretrained": None}})
        store.add_jobs([*jobs, keep_attempts_job])
        for i, job in enumerate(jobs):
            store.commit(job, JobResult(job.id, "kept", [unscored_attempt(0, noise(60 + i))], best=0))
        attempts = [unscored_attempt(n, noise(70 + n)) for n in range(3)]
        store.commit(keep_attempts_job, JobResult(keep_attempts_job.id, "kept", attempts, best=0),
                     keep_attempts=True)
    return {job.name: job for job in jobs}


def test_score_command_rescores_and_moves_files(tmp_path):
    run = tmp_path / "run"
    multi = Job("prompts", "multi", "t2i", "an owl", scoring=Scoring(thresholds={"text": -1, "clipscore": 0}))
    jobs = write_unscored_run(run, multi)
    result = CliRunner().invoke(main, ["score", str(run), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["clip_model"] == "tiny-clip" and summary["random_weights"]
    assert summary["changed"] == [{"job": jobs["hard"].id, "name": "prompts/hard", "from": "kept", "to": "rejected"}]
    with RunStore.open(run, readonly=True) as store:
        statuses = store.statuses()
        hard = jobs["hard"]
        assert statuses[hard.id] == "rejected" and statuses[jobs["easy"].id] == "kept"
        assert (run / store.image_path(hard, "rejected")).is_file()
        assert not (run / store.image_path(hard, "kept")).exists()
        (attempt,) = store.attempts(hard.id)
        assert attempt["params"]["scored"] and attempt["failed_metrics"] == ["text"]
        # the job that kept its attempt images now keeps the best-ranked one of the three
        rescored = store.attempts(multi.id)
        ranks = [rank(a["scores"], multi.scoring.thresholds) for a in rescored]
        with Image.open(run / store.image_path(multi, "kept")) as kept:
            assert json.loads(kept.info["omnigen2_batch"])["attempt"]["n"] == ranks.index(max(ranks))
        (pair,) = store.pairs()
        texts = {name: store.attempts(jobs[name].id)[0]["scores"]["text"] for name in ("fox-en", "fox-zh")}
    assert pair["pair"] == "fox" and -1 <= pair["similarity"] <= 1
    assert pair["text_gap"] == pytest.approx(texts["fox-en"] - texts["fox-zh"])


def test_score_command_refuses_a_folder_that_is_no_run(tmp_path):
    result = CliRunner().invoke(main, ["score", str(tmp_path), "--clip", "tiny-clip"])
    assert result.exit_code == 2 and "not a run directory" in result.output
