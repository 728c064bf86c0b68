"""plan.py: jobs from a recipe (ids, seeds, dependencies, order), settings and the estimate."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from omnigen2_batch.jobs import ImageRef, Job
from omnigen2_batch.cost import forwards_per_image
from omnigen2_batch.plan import build_plan, fit_size, order_jobs
from omnigen2_batch.recipe import RecipeError, load_recipe

ROOT = Path(__file__).parent.parent
TINY_TOUR = ROOT / "recipes" / "tiny_tour.yaml"


def plan_of(folder: Path, text: str, **kwargs):
    path = folder / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return build_plan(load_recipe(path), **kwargs)


def ids_and_seeds(plan) -> dict:
    return {f"{job.section}/{job.name}": (job.id, job.seed) for job in plan.jobs}


@pytest.fixture
def pictures(tmp_path):
    for index, name in enumerate(["front", "side", "back", "top"]):
        Image.new("RGB", (512 + 64 * index, 512), (40 * index, 90, 160)).save(tmp_path / f"{name}.png")
    Image.new("RGB", (1024, 512), "green").save(tmp_path / "wide.png")
    return tmp_path


def test_same_recipe_same_ids_and_seeds_across_loads_and_processes():
    first, second = build_plan(load_recipe(TINY_TOUR)), build_plan(load_recipe(TINY_TOUR))
    assert ids_and_seeds(first) == ids_and_seeds(second)
    assert len({job.seed for job in first.jobs}) > len(first.jobs) // 2  # seeds differ per job
    code = ("import json; from omnigen2_batch.plan import build_plan; "
            "from omnigen2_batch.recipe import load_recipe; "
            f"plan = build_plan(load_recipe({str(TINY_TOUR)!r})); "
            "print(json.dumps({f'{j.section}/{j.name}': [j.id, j.seed] for j in plan.jobs}))")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True, timeout=120).stdout
    assert {k: tuple(v) for k, v in json.loads(out).items()} == ids_and_seeds(first)


RECIPE = """name: x
model: tiny
defaults: {size: [64, 64], steps: 2}
prompts:
  - name: p
    prompt: "a {animal}"
    matrix: {animal: [cat, dog, fox]}
bilingual:
  - name: b
    pairs: [{name: tea, en: a teapot, zh: 茶壶}]
"""


def test_a_changed_prompt_changes_only_that_job(tmp_path):
    before = ids_and_seeds(plan_of(tmp_path, RECIPE))
    after = ids_and_seeds(plan_of(tmp_path, RECIPE.replace("dog", "wolf")))
    assert set(before) - set(after) == {"prompts/p/a-dog"}
    assert set(after) - set(before) == {"prompts/p/a-wolf"}
    assert {k: v for k, v in before.items() if k != "prompts/p/a-dog"} == {
        k: v for k, v in after.items() if k != "prompts/p/a-wolf"}


def test_adding_a_job_changes_no_other_job(tmp_path):
    before = ids_and_seeds(plan_of(tmp_path, RECIPE))
    after = ids_and_seeds(plan_of(tmp_path, RECIPE.replace("fox]", "fox, owl]")))
    assert set(after) - set(before) == {"prompts/p/a-owl"}
    assert all(after[key] == value for key, value in before.items())


def test_recipe_seed_moves_every_seed(tmp_path):
    base = ids_and_seeds(plan_of(tmp_path, RECIPE))
    other = ids_and_seeds(plan_of(tmp_path, RECIPE.replace("steps: 2", "steps: 2, seed: 9")))
    assert all(base[key][1] != other[key][1] for key in base)


def test_bilingual_pair_shares_seed_and_english_text(tmp_path):
    jobs = {job.name: job for job in plan_of(tmp_path, RECIPE).jobs if job.section == "bilingual/b"}
    en, zh = jobs["tea-en"], jobs["tea-zh"]
    assert (en.lang, zh.lang, zh.prompt) == ("en", "zh", "茶壶")
    assert en.seed == zh.seed and en.id != zh.id
    assert en.scoring.pair == zh.scoring.pair == "b/tea"
    assert en.scoring.text == zh.scoring.text == "a teapot"


def test_portrait_anchor_feeds_its_shots_and_comes_first(tmp_path):
    plan = plan_of(tmp_path, "name: x\nseries:\n  - character: robo\n    shots: [robo runs, robo sits]\n"
                             "characters:\n  robo: {portrait: a robot, size: [128, 128]}\n")
    anchor, *shots = plan.jobs
    assert (anchor.section, anchor.name, anchor.kind, anchor.width) == (
        "characters/robo", "portrait", "t2i", 128)
    assert [shot.section for shot in shots] == ["series/robo"] * 2
    for shot in shots:
        assert shot.kind == "incontext" and shot.width == 1024
        assert shot.inputs == shot.scoring.references == (ImageRef(f"job:{anchor.id}"),)
        assert shot.depends_on == (anchor.id,)


def test_reference_character_inputs_are_content_hashed_files(pictures):
    plan = plan_of(pictures, "name: x\ncharacters:\n  mira: {references: [front.png, side.png]}\n"
                             "series:\n  - {character: mira, name: trip, image_guidance: 3,\n"
                             "     shots: [{prompt: mira swims, image_guidance: 2.8}, mira runs]}\n")
    swims, runs = plan.jobs
    assert [ref.path for ref in swims.inputs] == [str(pictures / "front.png"), str(pictures / "side.png")]
    assert all(ref.key.startswith("sha256:") for ref in swims.inputs)
    assert swims.scoring.references == swims.inputs and swims.depends_on == ()
    assert (swims.section, swims.image_guidance, runs.image_guidance) == ("series/trip", 2.8, 3.0)


def test_edits_score_against_their_input_and_follow_its_shape(pictures):
    plan = plan_of(pictures, "name: x\ndefaults: {size: [512, 512]}\nedits:\n"
                             "  - name: e\n    inputs: [wide.png]\n    instructions:\n"
                             "      - make it night\n"
                             "      - {instruction: paint it, target_caption: a painting, "
                             "source_caption: a photo, size: [256, 256]}\n")
    night, paint = plan.jobs
    assert night.kind == "edit" and night.inputs == (night.scoring.source,)
    assert (night.width, night.height) == fit_size((1024, 512), (512, 512)) == (720, 352)
    assert night.image_guidance == 2.0 and night.scoring.text == "make it night"
    assert (paint.width, paint.height) == (256, 256)
    assert (paint.scoring.text, paint.scoring.source_caption) == ("a painting", "a photo")


def test_nearest_level_wins_and_thresholds_merge(tmp_path):
    plan = plan_of(tmp_path, "name: x\n"
                             "defaults: {steps: 9, text_guidance: 4, image_guidance: 3,\n"
                             "           scoring: {thresholds: {text: 0.2, clipscore: 20}}}\n"
                             "prompts:\n  - {name: p, prompt: a cat, steps: 5,\n"
                             "     scoring: {thresholds: {text: 0.3}}}\n")
    job = plan.jobs[0]
    assert (job.steps, job.text_guidance) == (5, 4.0)
    assert job.image_guidance == 1.0  # t2i has no input to guide by; ids stay honest
    assert job.scoring.thresholds == {"text": 0.3, "clipscore": 20.0}
    assert plan.config.clip.model == "ViT-B-32" and plan.config.model == "OmniGen2/OmniGen2"


def test_model_override_enters_the_job_ids(tmp_path):
    tiny = plan_of(tmp_path, RECIPE)
    real = build_plan(load_recipe(tmp_path / "recipe.yaml"), model_override="OmniGen2/OmniGen2")
    assert real.config.model == "OmniGen2/OmniGen2"
    assert {job.model for job in real.jobs} == {"OmniGen2/OmniGen2"}
    assert not {job.id for job in tiny.jobs} & {job.id for job in real.jobs}


def test_identical_jobs_are_an_error_naming_both_places(tmp_path):
    with pytest.raises(RecipeError) as caught:
        plan_of(tmp_path, "name: x\nprompts:\n  - {name: a, prompt: a cat}\n"
                          "  - {name: b, prompt: a cat}\n")
    (error,) = caught.value.errors
    assert "recipe.yaml:4: prompts[1].prompt: makes the same job as" in error
    assert "recipe.yaml:3: prompts[0].prompt" in error


def test_more_than_three_inputs_warn_once_and_fail_under_strict(pictures):
    text = ("name: x\ncharacters:\n  m: {references: [front.png, side.png, back.png, top.png]}\n"
            "series:\n  - {character: m, shots: [m runs, m sits]}\n")
    plan = plan_of(pictures, text)
    assert len(plan.warnings) == 1
    assert "series[0].shots[0]: 4 input images for one job (and 1 more jobs)" in plan.warnings[0]
    with pytest.raises(RecipeError, match="under --strict"):
        plan_of(pictures, text, strict=True)


def job(name: str, *deps: str, prompt: str = "") -> Job:
    return Job(section="s", name=name, kind="incontext" if deps else "t2i",
               prompt=prompt or name, inputs=tuple(ImageRef(f"job:{d}") for d in deps))


def test_order_puts_dependencies_first_and_keeps_the_rest_in_place():
    anchor = job("anchor")
    shot = job("shot", anchor.id)
    other = job("other")
    assert order_jobs([shot, other, anchor]) == [other, anchor, shot]


def test_order_reports_missing_dependencies_and_cycles():
    with pytest.raises(RecipeError, match="needs job 0000, which is not in the plan"):
        order_jobs([job("orphan", "0000")])
    # Ids hash their inputs, so a real cycle cannot be built; fake ids make one.
    class Fixed(Job):
        @property
        def id(self):
            return self.prompt

    a = Fixed(section="s", name="a", kind="incontext", prompt="A", inputs=(ImageRef("job:B"),))
    b = Fixed(section="s", name="b", kind="incontext", prompt="B", inputs=(ImageRef("job:A"),))
    c = Fixed(section="s", name="c", kind="t2i", prompt="C")
    with pytest.raises(RecipeError, match="cycle: s/a, s/b"):
        order_jobs([a, b, c])


def test_forward_count_follows_the_sampler_rule():
    t2i = Job(section="s", name="t", kind="t2i", prompt="p", steps=10, image_guidance=1.0,
              cfg_range=(0.0, 0.5))
    assert forwards_per_image(t2i) == 6 * 2 + 4  # steps 0..5 guided (i/10 <= 0.5)
    edit = t2i.with_(kind="edit", inputs=(ImageRef("sha256:x"),), image_guidance=2.0,
                     cfg_range=(0.0, 1.0))
    assert forwards_per_image(edit) == 10 * 3
    assert forwards_per_image(edit.with_(text_guidance=1.0)) == 10  # no guidance at all


def test_estimate_counts_images_forwards_and_seconds(tmp_path):
    plan = plan_of(tmp_path, RECIPE.replace("steps: 2}", "steps: 2, candidates: 2, max_attempts: 3}"))
    cost = plan.estimate
    assert (cost.jobs, cost.images, cost.images_worst) == (5, 10, 15)
    assert cost.forwards == 10 * 2 * 2 and cost.forwards_worst == 15 * 2 * 2
    assert 0 < cost.gpu_seconds < cost.gpu_seconds_worst


def test_plan_json_round_trips_jobs():
    plan = build_plan(load_recipe(TINY_TOUR))
    data = json.loads(json.dumps(plan.to_dict()))
    rebuilt = [Job.from_dict({k: v for k, v in row.items() if k not in ("id", "depends_on", "origin")})
               for row in data["jobs"]]
    assert [j.id for j in rebuilt] == [row["id"] for row in data["jobs"]] == [j.id for j in plan.jobs]
    assert all(row["origin"].startswith(str(TINY_TOUR)) for row in data["jobs"])
