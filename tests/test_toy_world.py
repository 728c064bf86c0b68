"""The toy world: rendering, EN/ZH captions, edits, characters, and the pixel judge's accuracy.

Accuracy tests measure the judge over many sampled scenes (not a few hand-picked ones) and on
perturbed images: blur and noise must not fool it, a wrong colour / shape / position / size /
background must be caught, and the failing attribute must be the one that was changed.
"""
import dataclasses
import random

import numpy as np
import pytest

from omnigen2_batch.toy.captions import (DETAILS, LANGS, CaptionError, ObjectSpec, SceneSpec, all_captions,
                                         caption, parse, spec_of)
from omnigen2_batch.toy.characters import (CHARACTER_POSITIONS, CharacterScene, make_incontext_task,
                                           random_character, read_identity, reference_image, render_characters)
from omnigen2_batch.toy.edits import KINDS, apply_edit, make_edit, parse_instruction
from omnigen2_batch.toy.judge import (identity_agreement, judge_caption, judge_character, judge_edit,
                                      judge_incontext, judge_scene, scene_from_pixels)
from omnigen2_batch.toy.scenes import (COLOURS, HELD_OUT, POSITIONS, SHAPES, SIZES, Scene, ShapeObject,
                                       boxes_overlap, default_layout, render, sample_scenes)
from omnigen2_batch.toy.perturb import blurred, noisy, soft

SCENES = sample_scenes(seed=11, count=150, max_objects=2)


def accuracy(items, check) -> float:
    return sum(bool(check(item)) for item in items) / len(items)


# -- scenes ------------------------------------------------------------------------------------

def test_render_is_deterministic_and_exact():
    scene = Scene("blue", (ShapeObject("red", "circle", "left", "large"),))
    first, second = np.asarray(render(scene)), np.asarray(render(scene))
    assert np.array_equal(first, second)
    colours = {tuple(c) for c in first.reshape(-1, 3)}
    assert colours == {COLOURS["blue"], COLOURS["red"]}  # flat: palette colours only
    assert tuple(first[32, 18]) == COLOURS["red"] and tuple(first[32, 60]) == COLOURS["blue"]
    assert render(scene, 128).size == (128, 128)


def test_sampler_is_seeded_and_respects_the_held_out_split():
    assert sample_scenes(3, 40) == sample_scenes(3, 40)
    assert sample_scenes(3, 40) != sample_scenes(4, 40)
    train, held = sample_scenes(1, 400, "train", 2), sample_scenes(2, 60, "eval")
    assert not any(scene.combos & HELD_OUT for scene in train)
    assert all(scene.combos & HELD_OUT for scene in held)
    # Held-out combos are new pairings of known words: each word still appears in training.
    seen = {(o.colour, o.shape, s.background) for s in train for o in s.objects}
    for colour, shape, background in HELD_OUT:
        assert any(c == colour for c, _, _ in seen) and any(s == shape for _, s, _ in seen)
        assert any(b == background for _, _, b in seen)


def test_default_layout_places_what_a_short_caption_leaves_open():
    """One object: large, centred. Two: small, side by side in the order named, never touching.
    The colours, shapes and background stay, so the short caption still reads the same."""
    for scene in SCENES:
        placed = default_layout(scene)
        assert placed.background == scene.background
        assert [(o.colour, o.shape) for o in placed.objects] == [(o.colour, o.shape) for o in scene.objects]
        assert caption(placed, "en", "short") == caption(scene, "en", "short")
        layout = [(o.position, o.size) for o in placed.objects]
        assert layout == ([("centre", "large")] if len(scene.objects) == 1 else [("left", "small"), ("right", "small")])
        assert not any(boxes_overlap(a, b) for i, a in enumerate(placed.objects) for b in placed.objects[i + 1:])
        assert judge_scene(render(placed), placed).ok


def test_an_invisible_object_is_refused():
    with pytest.raises(ValueError, match="invisible"):
        Scene("red", (ShapeObject("red", "circle"),))
    with pytest.raises(ValueError, match="unknown shape"):
        ShapeObject("red", "hexagon")


# -- captions ----------------------------------------------------------------------------------

@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("detail", DETAILS)
def test_every_caption_phrasing_parses_back_to_its_scene(lang, detail):
    for scene in SCENES[:60]:
        for text in all_captions(scene, lang, detail):
            assert parse(text) == spec_of(scene, detail), text


def test_the_two_required_captions_parse():
    wanted = SceneSpec("blue", (ObjectSpec("red", "circle"),))
    assert parse("a red circle on a blue background") == wanted
    assert parse("蓝色背景上的红色圆形") == wanted


def test_captions_in_both_languages_differ_and_paraphrases_parse():
    scene = SCENES[0]
    en, zh = all_captions(scene, "en", "full"), all_captions(scene, "zh", "full")
    assert len(set(en)) == len(en) >= 3 and len(set(zh)) == len(zh) >= 3
    assert parse("A big yellow square in the middle, background is black") == SceneSpec(
        "black", (ObjectSpec("yellow", "square", "centre", "large"),))
    assert parse("背景是白色，左侧有一个小的绿色三角形") == SceneSpec(
        "white", (ObjectSpec("green", "triangle", "left", "small"),))
    with pytest.raises(CaptionError, match="no object"):
        parse("a blue background")


# -- judge: captions and scenes ----------------------------------------------------------------

def test_judge_accepts_rendered_ground_truth_in_both_languages():
    pairs = [(scene, text) for scene in SCENES for lang in LANGS for text in all_captions(scene, lang, "full")[:1]]
    assert accuracy(pairs, lambda p: judge_caption(render(p[0]), p[1]).ok) == 1.0
    read = [scene_from_pixels(render(s)) for s in SCENES[:60]]
    assert all(r.background == s.background and sorted(r.objects, key=repr) == sorted(s.objects, key=repr)
               for r, s in zip(read, SCENES))


@pytest.mark.parametrize("perturb", [blurred, noisy, soft], ids=["blur", "noise", "vae-like"])
def test_judge_is_robust_to_blur_and_noise(perturb):
    assert accuracy(SCENES, lambda s: judge_scene(perturb(render(s)), s).ok) >= 0.97


def _wrong(scene: Scene, attribute: str, rng: random.Random) -> Scene | None:
    """The scene with one attribute of its first object (or its background) changed, or None
    when no change keeps the scene valid."""
    obj = scene.objects[0]
    used = {o.colour for o in scene.objects} | {scene.background}
    options = {
        "colour": [dataclasses.replace(obj, colour=c) for c in COLOURS if c not in used],
        "shape": [dataclasses.replace(obj, shape=s) for s in SHAPES if s != obj.shape],
        "position": [dataclasses.replace(obj, position=p) for p in POSITIONS if p != obj.position],
        "size": [dataclasses.replace(obj, size=s) for s in SIZES if s != obj.size],
    }
    if attribute == "background":
        return scene.__class__(rng.choice([c for c in COLOURS if c not in used]), scene.objects)
    if attribute == "count":
        return scene.with_objects(scene.objects[1:])
    return scene.with_objects([rng.choice(options[attribute]), *scene.objects[1:]])


@pytest.mark.parametrize("attribute", ["background", "colour", "shape", "position", "size", "count"])
def test_judge_catches_a_wrong_attribute_and_names_it(attribute):
    rng = random.Random(5)
    singles = [s for s in SCENES if len(s.objects) == 1][:60]
    caught = named = 0
    for scene in singles:
        wrong = _wrong(scene, attribute, rng)
        verdict = judge_scene(blurred(render(wrong), 0.8), scene)
        caught += not verdict.ok
        named += attribute in verdict.failed
    assert caught == len(singles)
    assert named / len(singles) >= 0.95


# -- edits -------------------------------------------------------------------------------------

def test_edits_produce_the_described_target_for_every_kind():
    rng = random.Random(3)
    counts = dict.fromkeys(KINDS, 0)
    for scene in SCENES:
        for kind in KINDS:
            try:
                edit = make_edit(rng, scene, kind)
            except ValueError:
                continue  # e.g. no free spot to add an object: fine, others cover the kind
            counts[kind] += 1
            for lang in LANGS:
                assert apply_edit(scene, parse_instruction(edit.instruction(lang))) == edit.target
            assert edit.target != scene
    assert min(counts.values()) >= 30, counts


def test_the_two_required_instructions_parse():
    circle = Scene("blue", (ShapeObject("red", "circle"),))
    assert apply_edit(circle, parse_instruction("make the circle green")).objects[0].colour == "green"
    assert apply_edit(circle, parse_instruction("把背景换成白色")).background == "white"


def test_judge_edit_accepts_the_target_and_catches_failed_or_sloppy_edits():
    rng = random.Random(8)
    edits = [make_edit(rng, s, split="train") for s in SCENES[:80]]
    good = accuracy(edits, lambda e: judge_edit(blurred(render(e.source)), e.instruction(rng.choice(LANGS)),
                                                noisy(render(e.target))).ok)
    assert good >= 0.97
    # The unedited source is never a correct output (the edit was not done) ...
    for edit in edits:
        verdict = judge_edit(render(edit.source), edit.instruction_en, render(edit.source))
        assert not verdict.ok and not verdict.did_edit, edit.instruction_en
    # ... and an edit that also changed something else did not keep the rest.
    recolours = [e for e in edits if e.spec.kind == "background" and e.source.objects]
    for edit in recolours:
        moved = edit.target.with_objects([_away(edit.target.objects[0]), *edit.target.objects[1:]])
        verdict = judge_edit(render(edit.source), edit.instruction_zh, render(moved))
        assert verdict.did_edit and not verdict.kept_rest and not verdict.ok
    assert recolours


def _away(obj: ShapeObject) -> ShapeObject:
    return dataclasses.replace(obj, size="small" if obj.size == "large" else "large")


# -- characters --------------------------------------------------------------------------------

def test_identities_are_read_back_from_references_and_scenes():
    rng = random.Random(4)
    tasks = [make_incontext_task(rng, subjects=1 + i % 2) for i in range(60)]
    for task in tasks:
        image = blurred(render_characters(task.target), 0.8)
        positions = [pos for _, pos in task.target.placed]
        for reference, (character, position) in zip(task.references, task.target.placed):
            assert read_identity(reference) == character
            assert read_identity(image, CHARACTER_POSITIONS[position]) == character
        assert judge_incontext(list(task.references), image, task.target.background, positions).ok
        assert "image 1" in task.instruction_en and "图1" in task.instruction_zh


def test_character_judge_separates_same_from_different_identity():
    rng = random.Random(9)
    same = different = 0
    for _ in range(80):
        hero, other = random_character(rng), random_character(rng)
        if other == hero:
            continue
        references = [reference_image(hero, rng) for _ in range(2)]
        for candidate, expect in ((hero, True), (other, False)):
            background = rng.choice([c for c in COLOURS if c not in candidate.colours | hero.colours] or [None])
            if background is None:
                continue
            shot = noisy(render_characters(CharacterScene(background, ((candidate, "right"),))), 15)
            verdict = judge_character(references, shot, "right")
            assert verdict.ok == expect, (hero, candidate, verdict.notes)
            same += expect
            different += not expect
        assert identity_agreement(hero, hero) == 1.0 > identity_agreement(hero, other)
    assert same >= 50 and different >= 50


def test_toy_package_imports_only_what_it_may():
    """toy/ sits low in the layers: jobs, images and third-party libraries only."""
    import ast
    from pathlib import Path

    allowed = {"omnigen2_batch.jobs", "omnigen2_batch.images"}
    for path in (Path(__file__).resolve().parents[1] / "omnigen2_batch" / "toy").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                raise AssertionError(f"{path.name}: relative import out of toy/ ({'.' * node.level}{node.module})")
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                if name.startswith("omnigen2_batch") and not name.startswith("omnigen2_batch.toy"):
                    assert name in allowed, f"{path.name} imports {name}"
