"""`validate`, `plan` and `schema` from the command line: exit codes, messages, no heavy imports."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from omnigen2_batch.cli import main
from omnigen2_batch.recipe import schema_text

ROOT = Path(__file__).parent.parent
TINY_TOUR = ROOT / "recipes" / "tiny_tour.yaml"  # every section kind on the random tiny model
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"  # every section kind on the shipped toy model
BROKEN = sorted((Path(__file__).parent / "recipes_broken").glob("*.yaml"))


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def expectation(path: Path) -> str:
    """The first line of a broken recipe says what validate must report: "# expect: LINE: ..."."""
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} lacks its '# expect: LINE: field' line"
    return f"{path.name}:{first.removeprefix('# expect: ')}"


@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_broken_recipe_exits_2_naming_file_line_and_field(path):
    result = invoke("validate", path)
    assert result.exit_code == 2, result.output
    assert expectation(path) in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_broken_corpus_is_not_empty():
    assert len(BROKEN) >= 20


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_example_recipes_are_valid(recipe):
    result = invoke("validate", recipe)
    assert result.exit_code == 0, result.output
    assert "valid" in result.stdout


def test_plan_json_lists_jobs_in_run_order_with_estimate():
    result = invoke("plan", TINY_TOUR, "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    ids = [job["id"] for job in plan["jobs"]]
    assert any(job["depends_on"] for job in plan["jobs"])  # the portrait anchor's shots
    for position, job in enumerate(plan["jobs"]):
        assert all(ids.index(dep) < position for dep in job["depends_on"])
    assert plan["estimate"]["jobs"] == len(ids)
    assert plan["config"]["model"] == "tiny"
    assert {job["kind"] for job in plan["jobs"]} == {"t2i", "incontext", "edit"}


def test_the_quickstart_plans_the_toy_model_with_its_scorer_and_defaults():
    plan = json.loads(invoke("plan", QUICKSTART, "--json").stdout)
    assert plan["config"]["model"] == "toy"
    assert plan["config"]["clip"] == {"model": "toy-clip", "pretrained": None, "multilingual": True}
    assert {job["kind"] for job in plan["jobs"]} == {"t2i", "incontext", "edit"}
    assert {(job["width"], job["height"], job["negative_prompt"]) for job in plan["jobs"]} == {(64, 64, "")}
    metrics = {job["kind"]: set(job["scoring"]["thresholds"]) for job in plan["jobs"]}
    assert metrics["t2i"] == {"text"} and "consistency_min" in metrics["incontext"]
    # another model keeps the recipe's other settings, and the built-in scorer is no longer toy
    tiny = json.loads(invoke("plan", QUICKSTART, "--json", "--set", "model=tiny").stdout)
    assert tiny["config"]["clip"]["model"] == "ViT-B-32" and tiny["jobs"][0]["width"] == 1024


def test_plan_table_and_model_override():
    result = invoke("plan", TINY_TOUR, "--model", "OmniGen2/OmniGen2")
    assert result.exit_code == 0, result.output
    assert "characters/robo" in result.stdout and "GPU-seconds" in result.stdout
    assert "model OmniGen2/OmniGen2" in result.stdout
    missing = invoke("plan", TINY_TOUR, "--model", "./no/such/folder")
    assert missing.exit_code == 2 and "--model: no such model folder" in missing.output


def test_schema_command_prints_the_shipped_schema():
    result = invoke("schema")
    assert result.exit_code == 0
    shipped = (ROOT / "omnigen2_batch" / "recipe_schema.json").read_text(encoding="utf-8")
    assert result.stdout == shipped == schema_text()


def small_input_recipe(tmp_path: Path) -> Path:
    Image.new("RGB", (300, 200), "red").save(tmp_path / "small.png")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: small\nedits:\n  - name: e\n    inputs: [small.png]\n"
                      "    instructions: [make it blue]\n")
    return recipe


def test_warnings_pass_but_strict_fails(tmp_path):
    recipe = small_input_recipe(tmp_path)
    lenient = invoke("validate", recipe)
    assert lenient.exit_code == 0
    assert "recipe.yaml:4: edits[0].inputs[0]: small.png: short side is 200 px" in lenient.stderr
    strict = invoke("validate", recipe, "--strict")
    assert strict.exit_code == 2
    assert "short side is 200 px" in strict.output and "--strict" in strict.output


def test_allow_path_admits_an_outside_folder(tmp_path):
    outside, inside = tmp_path / "shared", tmp_path / "project"
    outside.mkdir(), inside.mkdir()
    Image.new("RGB", (512, 512), "blue").save(outside / "hero.png")
    recipe = inside / "recipe.yaml"
    recipe.write_text("name: x\ncharacters:\n  hero: {references: [../shared/hero.png]}\n"
                      "series:\n  - character: hero\n    shots: [the hero runs]\n")
    refused = invoke("validate", recipe)
    assert refused.exit_code == 2 and "pass --allow-path DIR" in refused.output
    assert invoke("validate", recipe, "--allow-path", outside).exit_code == 0


def test_unreadable_recipe_file_exits_2(tmp_path):
    result = invoke("validate", tmp_path / "nope.yaml")
    assert result.exit_code == 2
    assert "nope.yaml: cannot read the recipe" in result.output


def run_cli_in_fresh_python(*args: str) -> dict:
    """Run a command in a new interpreter; report which heavy modules it imported."""
    code = ("import json, sys\nfrom omnigen2_batch.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as done:\n    code = done.code\n"
            "heavy = [m for m in ('torch', 'diffusers', 'ray', 'open_clip', 'transformers') "
            "if m in sys.modules]\n"
            "print(json.dumps({'code': code, 'heavy': heavy}), file=sys.stderr)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)
    return json.loads(done.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("args, code", [
    (("validate", "recipes/tiny_tour.yaml"), 0),
    (("plan", "recipes/tiny_tour.yaml", "--json"), 0),
    (("validate", "tests/recipes_broken/shot_size.yaml"), 2),
    (("schema",), 0),
], ids=["validate", "plan", "invalid", "schema"])
def test_commands_import_no_heavy_libraries(args, code):
    outcome = run_cli_in_fresh_python(*args)
    assert outcome == {"code": code, "heavy": []}
