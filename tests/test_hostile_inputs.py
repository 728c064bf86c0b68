"""Hostile input: every failure a person can cause ends in exit 2 naming file and field, fast,
with no traceback, and nothing is read without bound (FIFOs, devices, symlink loops, bombs)."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from omnigen2_batch.images import (MAX_GLOB_DIRS, ImageError, find_inputs, load_for_model,
                                   load_rgb, model_input_size)
from omnigen2_batch.plan import build_plan
from omnigen2_batch.prompt_budget import SYSTEM_PROMPT, TINY_AXES, text_budget
from omnigen2_batch.recipe import RecipeError, load_recipe

ROOT = Path(__file__).parent.parent


def cli(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    """The command line as a person runs it (`python cli.py ...`), in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def refused(result, *expected: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr
    return result.stderr


def write(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


# ---- values YAML accepts but Python cannot use --------------------------------------------

@pytest.mark.parametrize("setting, field", [
    ("size: [.nan, 64]", "defaults.size"), ("size: [64, .inf]", "defaults.size"),
    ("steps: .inf", "defaults.steps"), ("text_guidance: .nan", "defaults.text_guidance"),
    ("seed: -.inf", "defaults.seed"), ("cfg_range: [0, .nan]", "defaults.cfg_range"),
    ("scoring: {thresholds: {text: .nan}}", "defaults.scoring.thresholds.text"),
    ("image_guidance: 1" + "0" * 400, "defaults.image_guidance"),
])
def test_non_finite_numbers_are_errors(tmp_path, setting, field):
    path = write(tmp_path, f"name: x\ndefaults: {{{setting}}}\nprompts: [{{name: p, prompt: a}}]\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert caught.value.errors == [f"{path}:2: {field}: " + caught.value.errors[0].split(
        f"{field}: ", 1)[1]]


def test_cli_refuses_nan_surrogates_and_controls(tmp_path):
    for text, field, message in [
        ("name: x\ndefaults: {size: [.nan, 64]}\nprompts: [{name: p, prompt: a}]\n",
         "recipe.yaml:2: defaults.size", "expected [width, height]"),
        ('name: x\nprompts: [{name: p, prompt: "a \\ud800 cat"}]\n',
         "recipe.yaml:2: prompts[0].prompt", "contains the character \\ud800"),
        ('name: "run\\x1b[2J"\nprompts: [{name: p, prompt: a}]\n',
         "recipe.yaml:1: name", "contains the character \\x1b"),
        ('name: "run\\n"\nprompts: [{name: p, prompt: a}]\n',
         "recipe.yaml:1: name", 'got "run\\n"'),
    ]:
        refused(cli("validate", write(tmp_path, text)), field, message)


def test_a_trailing_newline_never_passes_a_name_pattern(tmp_path):
    for key in ("name", "prompts[0].name", "series[0].character", "characters.c"):
        text = ('name: "x"\nprompts: [{name: "p"}]\ncharacters: {"c": {portrait: a robot}}\n'
                'series: [{character: "c", shots: [run]}]\n')
        text = text.replace({"name": '"x"', "prompts[0].name": '"p"',
                             "series[0].character": 'character: "c"',
                             "characters.c": '{"c"'}[key],
                            {"name": '"x\\n"', "prompts[0].name": '"p\\n"',
                             "series[0].character": 'character: "c\\n"',
                             "characters.c": '{"c\\n"'}[key])
        with pytest.raises(RecipeError) as caught:
            load_recipe(write(tmp_path, text.replace('{name: "p"}', '{name: "p", prompt: a}')))
        assert any("\\n" in error for error in caught.value.errors), key


def test_nul_bytes_and_deep_nesting_name_the_line(tmp_path):
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"name: x\nprompts: [{name: p, prompt: a}]\n\x00\x00")
    refused(cli("validate", nul), "nul.yaml:3: the character \\x00")
    deep = write(tmp_path, "name: x\nx-a: " + "[" * 4000 + "]" * 4000 + "\n")
    refused(cli("validate", deep), "recipe.yaml:2: YAML nested too deeply")


# ---- what passes validate must not fail in run ----------------------------------------------

def test_images_too_small_for_the_model_are_errors(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    Image.new("RGB", (20, 20)).save(tmp_path / "small.png")
    text = "name: x\nedits: [{name: e, inputs: [dot.png, small.png], instructions: [x]}]\n"
    err = refused(cli("validate", write(tmp_path, text)),
                  "recipe.yaml:2: edits[0].inputs[0]: dot.png: too small for the model")
    assert "small.png" not in err  # 20x20 becomes 16x16: poor (a warning) but it runs
    with pytest.raises(ImageError, match="too small"):
        load_for_model(tmp_path / "dot.png", 1024)


def test_prompt_budget_is_the_tiny_models_positions():
    """The numbers prompt_budget repeats (it may not import torch) are the model's own."""
    tiny = ast.parse((ROOT / "omnigen2_batch/model/tiny.py").read_text(encoding="utf-8"))
    pipeline = ast.parse((ROOT / "omnigen2_batch/model/pipeline.py").read_text(encoding="utf-8"))
    constants = {target.id: node.value for tree in (tiny, pipeline) for node in tree.body
                 if isinstance(node, ast.Assign) for target in node.targets
                 if isinstance(target, ast.Name)}
    config = constants["TRANSFORMER_CONFIG"]
    axes = next(k.value for k in config.keywords if k.arg == "axes_lens")
    assert tuple(ast.literal_eval(axes)) == TINY_AXES
    assert ast.literal_eval(constants["SYSTEM_PROMPT"]) == SYSTEM_PROMPT
    budget = text_budget("tiny")
    assert budget.room(0) == 128 and budget.count(["a cat"])["a cat"] == 43


def test_long_prompts_are_refused_after_template_expansion(tmp_path):
    long_value = "very " * 30 + "big"
    text = ("name: x\nmodel: tiny\nprompts:\n  - name: p\n    prompt: 'a {size} fox'\n"
            f"    matrix: {{size: [small, '{long_value}']}}\n")
    refused(cli("validate", write(tmp_path, text)),
            "recipe.yaml:5: prompts[0].prompt: the prompt of this job is too long",
            "tiny has room for 128")
    fine = build_plan(load_recipe(write(tmp_path, text.replace(long_value, "big"))))
    assert len(fine.jobs) == 2
    # The same recipe for the released model: counted in UTF-8 bytes when its tokenizer is
    # not on this machine, an upper bound that still admits a 2,200-character prompt.
    huge = "a fox " * 370
    assert build_plan(load_recipe(write(tmp_path, f"name: x\nprompts: [{{name: p, prompt: '{huge}'}}]\n")))


def test_run_refuses_before_writing_anything(tmp_path):
    path = write(tmp_path, "name: x\nmodel: tiny\nprompts: [{name: p, prompt: '" + "fox " * 550 + "'}]\n")
    refused(cli("run", path, "--out", tmp_path / "out"), "prompts[0].prompt: the prompt")
    assert not (tmp_path / "out").exists()


# ---- unbounded reads, walks and memory -------------------------------------------------------

def test_fifo_and_devices_are_refused_without_reading(tmp_path):
    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    refused(cli("validate", fifo, timeout=30), "recipe.yaml: not a regular file")
    refused(cli("validate", "/dev/zero", timeout=30), "/dev/zero: not a regular file")
    os.mkfifo(tmp_path / "in.png")
    text = "name: x\nedits: [{name: e, inputs: [in.png], instructions: [x]}]\n"
    refused(cli("validate", write(tmp_path, text, "edit.yaml"), timeout=30), "no such file: in.png")


def test_recipe_size_is_capped(tmp_path):
    path = write(tmp_path, "name: x\nprompts: [{name: p, prompt: a}]\n" + "#" * (1 << 20))
    refused(cli("validate", path), "recipe.yaml: the recipe is over 1,048,576 bytes")


def test_globs_end_on_symlink_loops_and_stay_inside_the_roots(tmp_path):
    project = tmp_path / "project"
    (project / "in").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(project / "in" / "a.png")
    os.symlink(project, project / "in" / "loop")  # in/loop/in/loop/... forever for glob
    Image.new("RGB", (64, 64)).save(tmp_path / "secret.png")
    os.symlink(tmp_path, project / "in" / "out")  # a way out of the recipe's folder
    found = find_inputs("**/*.png", project, (project,))
    assert found == [project / "in" / "a.png"]
    text = "name: x\nedits: [{name: e, inputs: ['**/*.png'], instructions: [x]}]\n"
    assert cli("validate", write(project, text), timeout=30).returncode == 0
    for pattern in ("/**/*.png", "../**/*.png", "~/**/*.png"):
        with pytest.raises(ImageError, match="outside the recipe's folder"):
            find_inputs(pattern, project, (project,))


def test_globs_stop_past_their_folder_cap(tmp_path):
    for index in range(MAX_GLOB_DIRS + 1):
        (tmp_path / f"d{index}").mkdir()
    with pytest.raises(ImageError, match="reaches more than 2,000 folders; narrow it"):
        find_inputs("**/*.png", tmp_path, (tmp_path,))


def test_a_png_bomb_is_refused_everywhere(tmp_path):
    bomb = ROOT / "tests" / "recipes_broken" / "assets" / "bomb.png"
    for read in (load_rgb, lambda path: load_for_model(path, 1024)):
        with pytest.raises(ImageError, match="too many pixels"):
            read(bomb)


def test_jobs_are_counted_before_they_are_built(tmp_path):
    """200 groups of 10,000 jobs each (anchors keep the file small): refused from the count."""
    values = ", ".join(f"v{i}" for i in range(100))
    groups = "".join(f"  - {{name: g{i}, prompt: '{{a}} {{b}} {i}', matrix: {{a: *v, b: *v}}}}\n"
                     for i in range(200))
    path = write(tmp_path, f"name: x\nx-values: &v [{values}]\nprompts:\n{groups}")
    refused(cli("validate", path), "recipe.yaml:4: prompts[0]: the recipe makes 2,000,000 jobs "
                                   "(this entry 10,000); the limit is 10,000")


def test_alike_names_get_suffixes_in_order(tmp_path):
    prefix = "a very long shared prefix for every prompt in this group "
    values = ", ".join(f"x{i}" for i in range(3000))
    plan = build_plan(load_recipe(write(tmp_path, (
        f"name: x\nprompts:\n  - {{name: p, prompt: '{prefix}{{v}}', matrix: {{v: [{values}]}}}}\n"))))
    names = [job.name for job in plan.jobs]
    assert len(set(names)) == 3000
    assert names[:3] == [names[0], f"{names[0]}-2", f"{names[0]}-3"] and names[-1].endswith("-3000")


# ---- the shrinking loader --------------------------------------------------------------------

def test_load_for_model_gives_what_the_pipeline_would_encode(tmp_path):
    picture = Image.effect_noise((900, 700), 60).convert("RGB")
    picture.save(tmp_path / "p.png")
    loaded = load_for_model(tmp_path / "p.png", 512)
    target = model_input_size((900, 700), 512)
    assert loaded.size == target == (512, 384)
    # The pipeline's own resize (LANCZOS of load_rgb's image) gives the very same pixels.
    assert loaded.tobytes() == load_rgb(tmp_path / "p.png").resize(target, Image.LANCZOS).tobytes()


def test_large_jpegs_are_decoded_at_reduced_scale(tmp_path):
    Image.new("RGB", (4000, 3000), "navy").save(tmp_path / "big.jpg", quality=80)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    Image.new("RGB", (4000, 3000), "navy").save(tmp_path / "rot.jpg", quality=80, exif=exif)
    with Image.open(tmp_path / "big.jpg") as image:
        image.draft("RGB", model_input_size((4000, 3000), 1024))
        assert image.size == (2000, 1500)  # decoded at half size: the largest cut >= target
    assert load_for_model(tmp_path / "big.jpg", 1024).size == (1024, 768)
    assert load_for_model(tmp_path / "rot.jpg", 1024).size == (768, 1024)
    assert load_for_model(tmp_path / "big.jpg", 1024).getpixel((5, 5))[2] > 100  # still navy
