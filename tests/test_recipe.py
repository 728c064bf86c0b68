"""recipe.py: loading, every error at once with file:line, path rules, the JSON Schema."""
import json
import os
from pathlib import Path

import pytest
import yaml
from PIL import Image

from omnigen2_batch.recipe import RecipeError, json_schema, load_recipe, schema_text

ROOT = Path(__file__).parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def write(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def errors_of(path: Path, **kwargs) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, **kwargs)
    return caught.value.errors


def test_tiny_recipe_loads_into_typed_values():
    recipe = load_recipe(ROOT / "recipes" / "tiny_tour.yaml")
    assert recipe.model == "tiny"
    assert recipe.defaults.size == (64, 64)
    assert recipe.prompts[0].matrix == {"color": ["red", "blue"], "shape": ["cube", "sphere"]}
    refs = recipe.characters["mira"].references
    assert [ref.path.name for ref in refs] == ["mira_front.png", "mira_side.png"]
    assert all(ref.path.is_absolute() and "tiny_tour.yaml:" in ref.where for ref in refs)
    assert recipe.characters["robo"].portrait.startswith("a small round white robot")
    assert [f.path.name for f in recipe.edits[0].inputs[0]] == ["scene_car.png", "scene_house.png"]


def test_all_errors_are_reported_at_once_in_line_order(tmp_path):
    path = write(tmp_path, "name: x\n"
                           "defaults:\n"
                           "  steps: 0\n"
                           "prompts:\n"
                           "  - name: p\n"
                           "    prompt: a cat\n"
                           "    colour: red\n"
                           "series:\n"
                           "  - character: nobody\n"
                           "    shots: [run]\n")
    assert errors_of(path) == [
        f"{path}:3: defaults.steps: expected a value from 1 to 200, got 0",
        f"{path}:7: prompts[0].colour: unknown key",
        f"{path}:9: series[0].character: unknown character 'nobody'",
    ]


def test_error_label_is_the_path_as_given(tmp_path, monkeypatch):
    write(tmp_path, "name: x\nprompts: [{name: p, prompt: a cat, stpes: 3}]\n")
    monkeypatch.chdir(tmp_path)
    assert errors_of(Path("recipe.yaml")) == [
        "recipe.yaml:2: prompts[0].stpes: unknown key; did you mean 'steps'?"]


def test_anchors_and_merge_keys_work(tmp_path):
    path = write(tmp_path, "name: x\n"
                           "x-common: &common {steps: 7, size: [128, 64]}\n"
                           "prompts:\n"
                           "  - &first {<<: *common, name: a, prompt: a cat}\n"
                           "  - {<<: *first, name: b, prompt: a dog, steps: 9}\n")
    recipe = load_recipe(path)
    assert [(g.name, g.prompt, g.steps, g.size) for g in recipe.prompts] == [
        ("a", "a cat", 7, (128, 64)), ("b", "a dog", 9, (128, 64))]
    stray = write(tmp_path, "name: x\ncommon: {steps: 7}\nprompts: [{name: a, prompt: a}]\n")
    assert errors_of(stray) == [f"{stray}:2: common: unknown key"]


def test_unsafe_yaml_tags_are_refused(tmp_path):
    path = write(tmp_path, "name: !!python/object/apply:os.system [echo hi]\n")
    assert "recipe.yaml:1: YAML syntax error" in errors_of(path)[0]


def test_alias_bombs_are_refused(tmp_path):
    lines = ["name: x", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 7)]
    assert "after expanding aliases" in errors_of(write(tmp_path, "\n".join(lines)))[0]


def test_paths_may_not_leave_the_recipe_folder(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    Image.new("RGB", (512, 512)).save(tmp_path / "secret.png")
    Image.new("RGB", (512, 512)).save(project / "mine.png")
    os.symlink(tmp_path / "secret.png", project / "link.png")
    for reference in ("../secret.png", str(tmp_path / "secret.png"), "link.png"):
        path = write(project, "name: x\ncharacters:\n"
                              f"  c: {{references: ['{reference}']}}\n"
                              "series: [{character: c, shots: [run]}]\n")
        assert "outside the recipe's folder" in errors_of(path)[0], reference
        assert load_recipe(path, allow_paths=[tmp_path]).characters["c"].references
    inside = write(project, "name: x\ncharacters:\n"
                            f"  c: {{references: ['{project / 'mine.png'}']}}\n"
                            "series: [{character: c, shots: [run]}]\n")
    assert load_recipe(inside).characters["c"].references[0].path == project / "mine.png"


def test_globs_match_files_only_sorted_and_recursive(tmp_path):
    (tmp_path / "in" / "deep").mkdir(parents=True)
    for name in ("in/b.png", "in/a.png", "in/deep/c.png"):
        Image.new("RGB", (512, 512)).save(tmp_path / name)
    (tmp_path / "in" / "dir.png").mkdir()
    path = write(tmp_path, "name: x\nedits:\n"
                           "  - {name: e, inputs: ['in/*.png', 'in/**/c.png'], instructions: [x]}\n")
    inputs = load_recipe(path).edits[0].inputs
    assert [[f.path.name for f in matched] for matched in inputs] == [["a.png", "b.png"], ["c.png"]]
    assert "matched by 'in/*.png'" in inputs[0][0].where


def test_edit_size_accepts_input_or_a_size(tmp_path):
    Image.new("RGB", (512, 512)).save(tmp_path / "a.png")
    path = write(tmp_path, "name: x\nedits:\n  - name: e\n    inputs: [a.png]\n    size: input\n"
                           "    instructions: [x, {instruction: y, size: [256, 128]}]\n")
    campaign = load_recipe(path).edits[0]
    assert campaign.size == "input" and campaign.instructions[1].size == (256, 128)
    bad = write(tmp_path, "name: x\nedits:\n  - name: e\n    inputs: [a.png]\n    size: inptu\n"
                          "    instructions: [x]\n")
    assert "edits[0].size: expected one of 'input', got \"inptu\"" in errors_of(bad)[0]


def test_shipped_schema_is_the_generated_one():
    shipped = ROOT / "omnigen2_batch" / "recipe_schema.json"
    assert shipped.read_text(encoding="utf-8") == schema_text(), (
        "regenerate it: omnigen2-batch schema > omnigen2_batch/recipe_schema.json")


def test_every_schema_property_is_described():
    schema = json_schema()
    for owner in [schema, *schema["$defs"].values()]:
        for name, prop in owner["properties"].items():
            assert prop.get("description"), name


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_example_recipes_satisfy_the_json_schema(recipe):
    jsonschema = pytest.importorskip("jsonschema")
    data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    jsonschema.validate(data, json_schema())
    data["defaults"]["stesp"] = 3  # and the schema does refuse a wrong one
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, json_schema())


def test_schema_is_valid_json_schema():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(json.loads(schema_text()))
