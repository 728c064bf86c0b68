"""Issue 13 end to end through the CLI on the embedded tiny model and tiny random CLIP:
multi-subject shots, literal seeds, ranked variants, pick + export --picked, sweeps and their
grids, and the refusals (too many input images, too many sweep jobs)."""
import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from omnigen2_batch.cli import main

ASSETS = Path(__file__).resolve().parents[1] / "recipes" / "assets"
HEAD = """\
name: {name}
model: tiny
defaults:
  size: [64, 64]
  steps: 2
  max_input_side: 64
  scoring: {{model: tiny-clip, pretrained: random, thresholds: {{text: -1.0}}}}
"""


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def write_recipe(folder: Path, name: str, body: str) -> Path:
    """A recipe in `folder`, with the example assets copied beside it."""
    shutil.copytree(ASSETS, folder / "assets", dirs_exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(HEAD.format(name=name) + body)
    return path


def file_key(name: str) -> str:
    return "sha256:" + hashlib.sha256((ASSETS / name).read_bytes()).hexdigest()


def manifest(run_dir: Path, query: str, *args) -> list:
    with sqlite3.connect(run_dir / "manifest.sqlite") as conn:
        return conn.execute(query, args).fetchall()


def png_record(path: Path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.text["omnigen2_batch"])


def refused(result, *expected: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for text in expected:
        assert text in result.output, result.output


# ---------------------------------------------------------------------- multi-subject shots
PARK = """\
characters:
  mira: {references: [assets/mira_front.png]}
  leo: {references: [assets/leo.png]}
  dog: {references: [assets/dog.png]}
series:
  - name: park
    characters: [mira, leo, dog]
    images: {ball: assets/ball.png}
    shots: ["the girl from {mira} and the boy from {leo} throw {ball} to the dog from {dog}"]
"""


@pytest.mark.slow
def test_three_characters_and_an_object_in_declared_order_scored_per_character(tmp_path):
    recipe = write_recipe(tmp_path, "park", PARK)
    result = cli("run", recipe, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    (job_text, image), = manifest(tmp_path / "run", "SELECT job, image FROM jobs")
    job = json.loads(job_text)
    declared = [file_key(n) for n in ("mira_front.png", "leo.png", "dog.png", "ball.png")]
    assert [ref["key"] for ref in job["inputs"]] == declared
    assert png_record(tmp_path / "run" / image)["identity"]["inputs"] == declared
    assert job["prompt"] == ("the girl from image 1 and the boy from image 2 throw image 4 "
                             "to the dog from image 3")
    (scores,), = manifest(tmp_path / "run", "SELECT scores FROM attempts")
    scores = json.loads(scores)
    per_character = [scores[f"consistency.{name}"] for name in ("mira", "leo", "dog")]
    assert scores["consistency_min"] == pytest.approx(min(per_character))
    assert "consistency.ball" not in scores  # an object image is not a character
    page = (tmp_path / "run" / "report.html").read_text()
    for name in ("mira_front.png", "leo.png", "dog.png", "ball.png"):
        assert f"<figcaption><bdi>{name}</bdi></figcaption>" in page  # every reference shown


def test_six_input_images_are_refused_with_the_count(tmp_path):
    body = PARK.replace("mira: {references: [assets/mira_front.png]}",
                        "mira: {references: [assets/mira_front.png, assets/mira_side.png, "
                        "assets/scene_car.png]}")
    result = cli("validate", write_recipe(tmp_path, "crowd", body))
    refused(result, "crowd.yaml:16: series[0].shots[0]: 6 input images (mira 3, leo 1, dog 1, "
                    "ball 1); the model takes at most 5 per job")


# ---------------------------------------------------------------------- seeds and variants
SEEDS_AND_VARIANTS = """\
prompts:
  - name: robots
    prompt: "a small round robot"
    seeds: [1, 7, 42]
  - name: lamp
    prompt: "a brass lamp"
    variants: 3
    max_attempts: 3
"""


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("seeds")
    result = cli("run", write_recipe(folder, "seeds", SEEDS_AND_VARIANTS), "--out", folder / "run")
    assert result.exit_code == 0, result.output
    return folder / "run"


@pytest.mark.slow
def test_literal_seeds_make_one_job_each_recorded_as_given(seeds_run):
    rows = manifest(seeds_run, "SELECT image, job FROM jobs WHERE section='prompts/robots'")
    seeds = sorted(json.loads(job)["seed"] for _, job in rows)
    assert seeds == [1, 7, 42]
    from_pngs = []
    for image, _ in rows:
        with Image.open(seeds_run / image) as png:  # PIL's own reader of the text chunks
            from_pngs.append(int(png.text["parameters"].split("Seed: ")[1].split(",")[0]))
    assert sorted(from_pngs) == [1, 7, 42]


@pytest.mark.slow
def test_variants_keep_three_ranked_files(seeds_run):
    (image, variants, job_id), = manifest(
        seeds_run, "SELECT image, variants, id FROM jobs WHERE section='prompts/lamp'")
    ranking = json.loads(variants)
    assert [v["rank"] for v in ranking] == [1, 2, 3]
    assert ranking[0]["image"] == image
    assert ranking[1]["image"].endswith(f"-{job_id[:8]}-v2.png")
    files = [seeds_run / v["image"] for v in ranking]
    assert all(f.is_file() for f in files) and len({f.read_bytes() for f in files}) == 3
    attempts = {n: json.loads(s) for n, s in manifest(
        seeds_run, "SELECT n, scores FROM attempts WHERE job_id=?", job_id)}
    texts = [attempts[v["n"]]["text"] for v in ranking]  # text is the only threshold metric
    assert texts == sorted(texts, reverse=True)
    page = (seeds_run / "report.html").read_text()
    assert f"thumbs/{job_id}-v3.jpg" in page


@pytest.mark.slow
def test_pick_then_export_picked_exports_only_those_as_separate_records(seeds_run, tmp_path):
    robot = manifest(seeds_run, "SELECT image FROM jobs WHERE section='prompts/robots'")[0][0]
    (lamp,), = manifest(seeds_run, "SELECT id FROM jobs WHERE section='prompts/lamp'")
    assert cli("pick", seeds_run, seeds_run / robot, f"{lamp[:8]}:v2", f"{lamp[:8]}:v3",
               "--clear").exit_code == 0
    result = cli("export", seeds_run, tmp_path / "out", "--picked")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").open()]
    assert sorted((r["source"], r["variant"]) for r in records) == sorted(
        [(robot, 1)] + [(v["image"], v["rank"]) for v in json.loads(manifest(
            seeds_run, "SELECT variants FROM jobs WHERE id=?", lamp)[0][0])[1:]])
    for record in records:
        assert (tmp_path / "out" / record["file"]).read_bytes() == (seeds_run / record["source"]).read_bytes()


@pytest.mark.slow
def test_every_variant_leaves_kept_with_its_job_and_comes_back_with_it(tmp_path):
    lamp_only = SEEDS_AND_VARIANTS[SEEDS_AND_VARIANTS.index("  - name: lamp"):]
    recipe = write_recipe(tmp_path, "lamps", "prompts:\n" + lamp_only)
    assert cli("run", recipe, "--out", tmp_path / "run").exit_code == 0
    made = {p.name for p in (tmp_path / "run" / "kept").rglob("*.png")}
    assert len(made) == 3

    recipe.write_text(recipe.read_text().replace("a brass lamp", "a copper lamp"))
    assert cli("run", recipe, "--out", tmp_path / "run").exit_code == 0
    aside = {p.name for p in (tmp_path / "run" / "superseded").rglob("*.png")}
    assert aside == made  # all three ranks set aside, none left in kept/
    assert not made & {p.name for p in (tmp_path / "run" / "kept").rglob("*.png")}

    recipe.write_text(recipe.read_text().replace("a copper lamp", "a brass lamp"))
    assert cli("run", recipe, "--out", tmp_path / "run").exit_code == 0
    assert made <= {p.name for p in (tmp_path / "run" / "kept").rglob("*.png")}  # back, not redone
    for path in json.loads(manifest(tmp_path / "run", "SELECT variants FROM jobs "
                                    "WHERE status='kept' AND job LIKE '%brass%'")[0][0]):
        assert (tmp_path / "run" / path["image"]).is_file()

    recipe.write_text(recipe.read_text().replace("a brass lamp", "a tin lamp"))
    assert cli("run", recipe, "--out", tmp_path / "run").exit_code == 0
    assert cli("prune", tmp_path / "run").exit_code == 0
    assert not list((tmp_path / "run").glob("superseded/**/*.png"))


@pytest.mark.slow
def test_pick_refuses_an_image_that_is_not_kept(seeds_run):
    refused(cli("pick", seeds_run, "0000000000:v9"), "not a kept image")


# ---------------------------------------------------------------------- sweeps
SWEEP = """\
prompts:
  - name: grid
    prompt: "a lighthouse, {style}"
    sweep:
      text_guidance: [2, 4, 6]
      style: [watercolor, ink]
"""


@pytest.mark.slow
def test_a_3x2_sweep_makes_six_jobs_and_a_labelled_grid_of_their_images(tmp_path):
    recipe = write_recipe(tmp_path, "sweep", SWEEP)
    plan = cli("plan", recipe)
    assert "sweep prompts/grid: text_guidance 3 x style 2: 6 jobs, ~" in plan.output
    result = cli("run", recipe, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    rows = {i: (json.loads(job), image) for i, job, image in
            manifest(tmp_path / "run", "SELECT id, job, image FROM jobs")}
    assert sorted((j["text_guidance"], j["prompt"]) for j, _ in rows.values()) == sorted(
        (g, f"a lighthouse, {s}") for g in (2.0, 4.0, 6.0) for s in ("watercolor", "ink"))
    with Image.open(tmp_path / "run" / "grids" / "prompts" / "grid.png") as grid:
        boxes = json.loads(grid.text["omnigen2_batch_grid"])["cells"]
        grid = grid.convert("RGB")
    assert set(boxes) == set(rows)
    for job_id, (x, y, w, h) in boxes.items():
        with Image.open(tmp_path / "run" / rows[job_id][1]) as own:
            assert grid.crop((x, y, x + w, y + h)).tobytes() == own.convert("RGB").tobytes()
    columns = sorted({x for x, *_ in boxes.values()})
    by_guidance = {rows[i][0]["text_guidance"]: box[0] for i, box in boxes.items()}
    assert [by_guidance[g] for g in (2.0, 4.0, 6.0)] == columns  # X is the first axis
    top = min(y for _, y, *_ in boxes.values())
    labels = grid.crop((columns[0], 0, grid.width, top)).convert("L")
    assert labels.getextrema()[0] < 100  # axis names and values are drawn above the cells
    page = (tmp_path / "run" / "report.html").read_text()
    assert 'data-grid="grids/prompts/grid.png"' in page


@pytest.mark.slow
def test_a_third_axis_makes_one_labelled_grid_per_value(tmp_path):
    body = SWEEP.replace("      style: [watercolor, ink]\n",
                         "      style: [watercolor, ink]\n      steps: [1, 2]\n")
    result = cli("run", write_recipe(tmp_path, "cube", body), "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    steps_of = {i: json.loads(job)["steps"] for i, job in
                manifest(tmp_path / "run", "SELECT id, job FROM jobs")}
    assert sorted(steps_of.values()) == [1] * 6 + [2] * 6
    for z, steps in enumerate((1, 2), start=1):
        with Image.open(tmp_path / "run" / "grids" / "prompts" / f"grid-z{z}.png") as grid:
            cells = json.loads(grid.text["omnigen2_batch_grid"])["cells"]
        assert len(cells) == 6 and {steps_of[i] for i in cells} == {steps}


def test_a_sweep_over_max_jobs_is_refused_with_the_count(tmp_path):
    body = ("prompts:\n  - name: big\n    prompt: 'a {a} {b}'\n    sweep:\n"
            f"      a: [{', '.join(f'a{i}' for i in range(73))}]\n"
            f"      b: [{', '.join(f'b{i}' for i in range(137))}]\n")
    refused(cli("plan", write_recipe(tmp_path, "big", body)),
            "big.yaml:9: prompts[0]: the recipe makes 10,001 jobs", "the limit is 10,000 (max_jobs)")


@pytest.mark.parametrize("body, expected", [
    ("  - {name: p, prompt: 'a {s}', sweep: {s: [x], stepz: [a]}}\n",
     "prompts[0].sweep.stepz: no prompt of this section uses {stepz}"),
    ("  - {name: p, prompt: 'a', sweep: {steps: [1, 300]}}\n",
     "prompts[0].sweep.steps[1]: expected a value from 1 to 200"),
    ("  - {name: p, prompt: 'a {q}', sweep: {steps: [1], seed: [1], q: [a], cfg_range: [[0, 1]]}}\n",
     "prompts[0].sweep: expected 1 to 3 axes"),
    ("  - {name: p, prompt: 'a', sweep: {image_guidance: [2, 3]}}\n",
     "prompts[0].sweep.image_guidance: text-to-image jobs have no input image"),
    ("  - {name: p, prompt: 'a', seeds: [3, 3]}\n", "prompts[0].seeds: seed 3 is listed twice"),
    ("  - {name: p, prompt: 'a {nobody}', characters: [nobody]}\n",
     "prompts[0].characters[0]: unknown character 'nobody'"),
    ("  - {name: p, prompt: 'a', variants: 5, max_attempts: 3}\n",
     "prompts[0].prompt: variants (5) exceeds max_attempts (3)"),
])
def test_new_keys_are_validated_with_file_line_and_field(tmp_path, body, expected):
    refused(cli("validate", write_recipe(tmp_path, "bad", "prompts:\n" + body)),
            f"bad.yaml:9: {expected}")
