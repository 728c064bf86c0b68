"""Issue 12's recipe keys and run flags, through the one run configuration: `lora`, `cache` and
`mode` at every level, `transformer` and `compile` for the run. They validate with file:line
messages, enter job identity only when set (existing ids stay), and reach the pipeline: checked
on the embedded tiny model, its real LoRA fixture and tiny random CLIP."""
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from omnigen2_batch.cli import main
from omnigen2_batch.jobs import GenRequest
from omnigen2_batch.plan import build_plan
from omnigen2_batch.model.presets import PRESETS
from omnigen2_batch.config import BUILTIN_DEFAULTS
from omnigen2_batch.recipe import load_recipe
from omnigen2_batch.recipe_weights import MODES

ROOT = Path(__file__).resolve().parents[1]
LORA = ROOT / "tests" / "fixtures" / "parity" / "feature_cases" / "lora_tiny.safetensors"
HEAD = """\
name: {name}
model: tiny
defaults:
  size: [64, 64]
  steps: 2
  scoring: {{model: tiny-clip, pretrained: random, thresholds: {{text: -1.0}}}}
"""
# recipes/tiny_tour.yaml (once quickstart.yaml)'s job ids before these keys existed (main at f3879e5): a new key that
# leaked into the identity of jobs that do not use it would redo every existing run's work.
TINY_TOUR_IDS = [
    "fbd211bd6d849c3f", "124092be3c6a2c72", "a999b1843f607ec2", "6e8608609a71946c",
    "76ca40709b9bef7a", "9d6ad64e21445782", "edaa473c1f8bfab1", "f4aa6fbea493467d",
    "3fbcdd40e4b12df4", "c911ce0c2098e80a", "501c482a1e57b058", "900ec9f9fb6e2f26",
    "f9b3b656f5cdf615", "dde8fc3e49178118", "1c70f4f6c64ccde8"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def write(folder: Path, body: str, name: str = "opts") -> Path:
    """A recipe in `folder` with the tiny LoRA beside it as style.safetensors."""
    shutil.copy(LORA, folder / "style.safetensors")
    path = folder / f"{name}.yaml"
    path.write_text(HEAD.format(name=name) + body)
    return path


def plan_of(path: Path, **kwargs):
    return build_plan(load_recipe(path), **kwargs)


def jobs_by_name(plan) -> dict:
    return {f"{job.section}/{job.name}": job for job in plan.jobs}


# ---------------------------------------------------------------------------- identity
def test_tiny_tour_ids_are_unchanged():
    assert [job.id for job in plan_of(ROOT / "recipes" / "tiny_tour.yaml").jobs] == TINY_TOUR_IDS


def test_mode_exact_and_cache_none_change_no_id(tmp_path):
    plain = plan_of(write(tmp_path, "prompts: [{name: p, prompt: a red cube}]\n"))
    spelled = plan_of(write(tmp_path, "prompts: [{name: p, prompt: a red cube, mode: exact, "
                                      "cache: none, lora: []}]\n", "spelled"))
    assert [job.id for job in plain.jobs] == [job.id for job in spelled.jobs]


def test_lora_enters_identity_by_content_and_scale(tmp_path):
    body = "prompts: [{name: p, prompt: a red cube, seeds: [5], lora: [{path: %s, scale: %s}]}]\n"
    first = plan_of(write(tmp_path, body % ("style.safetensors", 0.8))).jobs[0]
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(LORA, moved / "renamed.safetensors")
    assert plan_of(write(tmp_path, body % ("moved/renamed.safetensors", 0.8))).jobs[0].id == first.id
    assert plan_of(write(tmp_path, body % ("style.safetensors", 0.5))).jobs[0].id != first.id
    data = bytearray((moved / "renamed.safetensors").read_bytes())
    data[-1] ^= 1  # one weight changes
    (moved / "renamed.safetensors").write_bytes(bytes(data))
    assert plan_of(write(tmp_path, body % ("moved/renamed.safetensors", 0.8))).jobs[0].id != first.id
    assert first.identity()["lora"] == [[first.lora[0].key, 0.8]]
    assert first.lora[0].key.startswith("sha256:")


def test_transformer_enters_every_job_identity_by_content(tmp_path):
    recipe = write(tmp_path, "prompts: [{name: p, prompt: [a red cube, a blue cone]}]\n")
    plain = plan_of(recipe)
    weights = tmp_path / "tuned.safetensors"
    shutil.copy(LORA, weights)  # any safetensors: the plan only hashes it
    tuned = plan_of(recipe, transformer_override=str(weights))
    assert len({job.transformer for job in tuned.jobs}) == 1
    assert tuned.jobs[0].transformer.startswith("sha256:")
    assert not {job.id for job in tuned.jobs} & {job.id for job in plain.jobs}
    assert tuned.config.transformer == str(weights)
    in_recipe = plan_of(write(tmp_path, "transformer: tuned.safetensors\n"
                                        "prompts: [{name: p, prompt: [a red cube, a blue cone]}]\n"))
    assert [job.id for job in in_recipe.jobs] == [job.id for job in tuned.jobs]


def test_mode_fast_fills_only_what_no_level_sets(tmp_path):
    plan = plan_of(write(tmp_path, """\
  mode: fast
prompts:
  - {name: fast, prompt: a red cube}
  - {name: euler, prompt: a red cube, scheduler: euler}
  - {name: nocache, prompt: a red cube, cache: none}
  - {name: tea, prompt: a red cube, cache: {teacache: 0.1}, cfg_range: [0, 0.8]}
  - {name: exact, prompt: a red cube, mode: exact}
"""))
    from omnigen2_batch.model import preset

    fast = preset("fast")
    jobs = {job.section.split("/")[1]: job for job in plan.jobs}
    concrete = {name: (job.cfg_range, job.scheduler, job.cache, job.cache_threshold)
                for name, job in jobs.items()}
    assert concrete == {
        "fast": (fast.cfg_range, fast.scheduler, fast.cache.kind, None),
        "euler": (fast.cfg_range, "euler", "taylorseer", None),
        "nocache": (fast.cfg_range, "dpmsolver++", "none", None),
        "tea": ((0.0, 0.8), "dpmsolver++", "teacache", 0.1),
        "exact": ((0.0, 1.0), "euler", "none", None),
    }
    assert set(MODES) == set(PRESETS)


def test_teacache_without_threshold_plans_the_model_default(tmp_path):
    from omnigen2_batch.model import CacheConfig

    job = plan_of(write(tmp_path, "prompts: [{name: p, prompt: a cube, cache: teacache}]\n")).jobs[0]
    assert (job.cache, job.cache_threshold) == ("teacache", CacheConfig("teacache").threshold)
    assert job.identity()["cache_threshold"] == job.cache_threshold


# ---------------------------------------------------------------------------- validation
def safetensors_without_lora(path: Path) -> Path:
    header = json.dumps({"weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0\0\0")
    return path


@pytest.mark.parametrize("body, expected", [
    ("  lora: [{path: nope.safetensors}]\n",
     "opts.yaml:7: defaults.lora[0].path: no such file: nope.safetensors"),
    ("  lora: [{path: opts.yaml}]\n", "opts.yaml:7: defaults.lora[0].path: expected a .safetensors file"),
    ("  lora: [{path: fake.safetensors}]\n", "opts.yaml:7: defaults.lora[0].path: fake.safetensors "
                                             "is not a safetensors file"),
    ("  lora: [{path: plain.safetensors}]\n", "opts.yaml:7: defaults.lora[0].path: plain.safetensors "
                                              "holds no LoRA weights"),
    ("  lora: [{path: style.safetensors, scale: .nan}]\n",
     "opts.yaml:7: defaults.lora[0].scale: expected a finite number"),
    ("  lora: [{path: style.safetensors, scale: 3}]\n",
     "opts.yaml:7: defaults.lora[0].scale: expected a value from -2 to 2, got 3"),
    ("  lora: [{path: style.safetensors}, {path: ./style.safetensors, scale: 0.5}]\n",
     "opts.yaml:7: defaults.lora[1].path: style.safetensors is listed twice"),
    ("  lora: [{path: style.safetensors}, {path: copy.safetensors}]\n",
     "the same file content as"),
    ("  lora: [{path: ../outside.safetensors}]\n", "outside the recipe's folder"),
    ("  lora: style.safetensors\n", "opts.yaml:7: defaults.lora: expected a list of {path, scale}"),
    ("  cache: teacach\n", "opts.yaml:7: defaults.cache: expected none, teacache, taylorseer or "
                           "{teacache: THRESHOLD}, got \"teacach\"; did you mean 'teacache'?"),
    ("  cache: {teacache: 0}\n", "opts.yaml:7: defaults.cache.teacache: expected a TeaCache "
                                 "threshold above 0"),
    ("  cache: {taylorseer: 3}\n", "opts.yaml:7: defaults.cache: expected none, teacache"),
    ("  mode: quick\n", "opts.yaml:7: defaults.mode: expected one of 'exact', 'fast'"),
    ("transformer: missing/\n", "opts.yaml:3: transformer: no such file or folder: missing/"),
    ("transformer: opts.yaml\n", "opts.yaml:3: transformer: expected a folder or a .safetensors"),
    ("compile: true\noffload: group\n", "opts.yaml:3: compile: works with offload none or model"),
], ids=["missing", "not-safetensors", "damaged", "no-lora-keys", "nan", "scale-range", "twice",
        "same-content", "outside", "not-a-list", "cache-kind", "threshold", "cache-mapping",
        "mode", "transformer-missing", "transformer-not-weights", "compile-offload"])
def test_bad_values_name_file_line_and_field(tmp_path, body, expected):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "fake.safetensors").write_bytes(b"not a safetensors file")
    safetensors_without_lora(folder / "plain.safetensors")
    shutil.copy(LORA, folder / "copy.safetensors")
    shutil.copy(LORA, tmp_path / "outside.safetensors")
    shutil.copy(LORA, folder / "style.safetensors")
    head = HEAD.format(name="opts")
    if body.startswith(" "):  # a defaults key, on line 7
        text = head + body
    else:  # a top-level key, on line 3
        text = head.replace("defaults:", body + "defaults:", 1)
    recipe = folder / "opts.yaml"
    recipe.write_text(text + "prompts: [{name: p, prompt: a cube}]\n")
    result = cli("validate", recipe)
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output


def test_run_flags_refuse_bad_values_without_a_traceback(tmp_path):
    recipe = write(tmp_path, "prompts: [{name: p, prompt: a cube}]\n")
    cases = [(["--transformer", tmp_path / "none.safetensors"], 2, "--transformer: no such file"),
             (["--transformer", recipe], 2, "expected a folder or a .safetensors file"),
             (["--compile", "--offload", "sequential"], 2, "--compile: works with offload none")]
    for flags, code, message in cases:
        result = cli("run", recipe, "--out", tmp_path / "run", *flags)
        assert result.exit_code == code and message in result.output, (flags, result.output)
        assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_preflight_checks_the_transformer_before_any_work(tmp_path):
    recipe = write(tmp_path, "prompts: [{name: p, prompt: a cube}]\n")
    result = cli("run", recipe, "--out", tmp_path / "run", "--transformer", tmp_path)
    assert result.exit_code == 3, result.output  # a folder, but no transformer in it
    assert f"transformer: {tmp_path}: missing config.json" in result.output
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- the pipeline
def test_worker_passes_offload_transformer_and_compile_to_load_pipeline():
    """Cheap: torch.compile wraps the blocks at load and compiles only at the first call."""
    from omnigen2_batch.config import ClipConfig, RunConfig
    from omnigen2_batch.worker import build_worker

    config = RunConfig(model="tiny", device="cpu", score=False, clip=ClipConfig("tiny-clip", None))
    compiled = build_worker(config.with_(compile=True)).generator.pipeline.transformer
    assert any(getattr(m, "_compiled_call_impl", None) for m in compiled.modules())
    plain = build_worker(config).generator.pipeline.transformer
    assert not any(getattr(m, "_compiled_call_impl", None) for m in plain.modules())
    # offload reaches load_pipeline as its mode (a bool would read as "model" and pass)
    with pytest.raises(ValueError, match="not 'group'"):
        build_worker(config.with_(compile=True, offload="group"))


class CallCounter:
    """The real tiny pipeline, recording the `lora` and `cache` of each call."""

    def __init__(self, pipeline):
        self.pipeline, self.calls = pipeline, []

    def __getattr__(self, name):
        return getattr(self.pipeline, name)

    def __call__(self, **kwargs):
        self.calls.append((len(kwargs["prompt"]), kwargs["lora"], kwargs["cache"]))
        return self.pipeline(**kwargs)


def test_lora_scales_and_caches_split_pipeline_calls_and_load_once(tmp_path):
    from omnigen2_batch.generate import PipelineGenerator
    from omnigen2_batch.model import load_pipeline

    Image.new("RGB", (64, 64), "white").save(tmp_path / "ref.png")
    plan = plan_of(write(tmp_path, """\
series:
  - name: looks
    character: robo
    lora: [{path: style.safetensors, scale: 0.5}]
    shots:
      - "the robot from the image reads"
      - "the robot from the image sings"
      - {prompt: "the robot from the image sleeps", lora: [{path: style.safetensors, scale: 1.0}]}
      - {prompt: "the robot from the image runs", cache: teacache}
characters:
  robo: {references: [ref.png]}
""", "split"))
    image = Image.new("RGB", (64, 64), "white")
    requests = [GenRequest.for_job(job, [image]) for job in plan.jobs]
    pipeline = CallCounter(load_pipeline("tiny", "cpu"))
    images = PipelineGenerator(pipeline).generate(requests)
    assert len(images) == 4
    key = plan.jobs[0].lora[0].key
    calls = sorted(pipeline.calls, key=lambda call: (-call[0], str(call[1])))
    assert [(n, lora) for n, lora, _ in calls] == [(2, {key: 0.5}), (1, {key: 0.5}), (1, {key: 1.0})]
    cached = [cache for n, lora, cache in pipeline.calls if cache is not None]
    assert [(c.kind, c.threshold) for c in cached] == [("teacache", 0.05)]
    assert pipeline.pipeline.loras.names == [key]  # one file: loaded once, scales per call


# ---------------------------------------------------------------------------- end to end
RUN_BODY = """\
prompts:
  - {name: plain, prompt: a red cube on a table, seeds: [5]}
  - {name: styled, prompt: a red cube on a table, seeds: [5],
     lora: [{path: style.safetensors, scale: 0.8}]}
  - {name: tea, prompt: a blue cone, cache: {teacache: 0.1}}
  - {name: fast, prompt: a blue cone, mode: fast}
"""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("options")
    recipe = write(folder, RUN_BODY, "e2e")
    result = cli("run", recipe, "--out", folder / "run", "--offload", "model", "--device", "cpu")
    assert result.exit_code == 0, result.output
    with sqlite3.connect(folder / "run" / "manifest.sqlite") as conn:
        rows = conn.execute("SELECT j.section, j.image, a.seed, a.params FROM jobs j "
                            "JOIN attempts a ON a.job_id = j.id AND a.n = j.best").fetchall()
    return {section.split("/")[1]: (folder / "run" / image, seed, json.loads(params))
            for section, image, seed, params in rows}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def png_params(path: Path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.text["omnigen2_batch"])["attempt"]["params"]


@pytest.mark.slow
def test_lora_from_the_recipe_changes_the_image_as_a_direct_call_does(finished_run):
    import torch

    from omnigen2_batch.model import load_pipeline

    (plain, _, _), (styled, seed, params) = finished_run["plain"], finished_run["styled"]
    assert not np.array_equal(pixels(plain), pixels(styled))
    assert [lora["scale"] for lora in params["lora"]] == [0.8]
    pipe = load_pipeline("tiny", "cpu")
    name = pipe.load_lora(LORA)
    direct = pipe(prompt=["a red cube on a table"], input_images=[[]],
                  negative_prompt=[BUILTIN_DEFAULTS["negative_prompt"]],
                  height=64, width=64, num_inference_steps=2, text_guidance_scale=5.0,
                  image_guidance_scale=1.0, cfg_range=(0.0, 1.0), scheduler="euler",
                  generator=[torch.Generator("cpu").manual_seed(seed)], lora={name: 0.8},
                  output_type="pil").images[0]
    assert seed == 5
    np.testing.assert_array_equal(pixels(styled), np.asarray(direct))


@pytest.mark.slow
def test_cache_and_fast_mode_record_their_concrete_settings(finished_run):
    from omnigen2_batch.model import preset

    _, _, tea = finished_run["tea"]
    _, _, fast = finished_run["fast"]
    assert (tea["cache"], tea["cache_threshold"], tea["scheduler"]) == ("teacache", 0.1, "euler")
    expected = preset("fast")
    assert (tuple(fast["cfg_range"]), fast["scheduler"], fast["cache"]) == (
        expected.cfg_range, expected.scheduler, expected.cache.kind)
    for name in ("tea", "fast"):  # the PNG carries the same record
        image, _, params = finished_run[name]
        assert png_params(image) == params
    _, _, plain = finished_run["plain"]
    assert not {"lora", "cache", "cache_threshold"} & set(plain)
