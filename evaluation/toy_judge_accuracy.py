"""How often the toy judge is right, measured on rendered ground truth and perturbed images.

    python evaluation/toy_judge_accuracy.py [--count 300] [--seed 0]

Rows: acceptance of correct images (clean, blurred, noisy, VAE-like down-up resize), rejection
of images with one attribute wrong (and whether the verdict names it), edit verdicts, and the
character-identity judge on same vs different identities. Prints a table; asserts nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnigen2_batch.toy.captions import caption  # noqa: E402
from omnigen2_batch.toy.characters import CharacterScene, random_character, reference_image, render_characters  # noqa: E402
from omnigen2_batch.toy.edits import make_edit  # noqa: E402
from omnigen2_batch.toy.judge import judge_caption, judge_character, judge_edit, judge_scene  # noqa: E402
from omnigen2_batch.toy.perturb import blurred, noisy, soft  # noqa: E402
from omnigen2_batch.toy.scenes import COLOURS, POSITIONS, SHAPES, SIZES, render, sample_scenes  # noqa: E402


PERTURBATIONS = {"clean": lambda im: im, "blur 1.2": blurred, "noise 25": noisy, "vae-like": soft}


def one_wrong(scene, attribute: str, rng: random.Random):
    obj = scene.objects[0]
    used = {o.colour for o in scene.objects} | {scene.background}
    if attribute == "background":
        return dataclasses.replace(scene, background=rng.choice([c for c in COLOURS if c not in used]))
    choices = {"colour": [c for c in COLOURS if c not in used], "shape": [s for s in SHAPES if s != obj.shape],
               "position": [p for p in POSITIONS if p != obj.position], "size": [s for s in SIZES if s != obj.size]}
    return scene.with_objects([dataclasses.replace(obj, **{attribute: rng.choice(choices[attribute])})])


def rows(count: int, seed: int):
    rng = random.Random(seed)
    scenes = sample_scenes(seed, count, max_objects=2)
    for name, perturb in PERTURBATIONS.items():
        for lang in ("en", "zh"):
            yield f"accepts correct ({name}, {lang} caption)", np.mean(
                [judge_caption(perturb(render(s)), caption(s, lang, "full", i)).ok for i, s in enumerate(scenes)])
    singles = [s for s in scenes if len(s.objects) == 1]
    for attribute in ("background", "colour", "shape", "position", "size"):
        verdicts = [judge_scene(blurred(render(one_wrong(s, attribute, rng)), 0.8), s) for s in singles]
        yield f"rejects wrong {attribute} (blurred)", np.mean([not v.ok for v in verdicts])
        yield f"  ... and names {attribute}", np.mean([attribute in v.failed for v in verdicts])
    edits = [make_edit(rng, s) for s in scenes]
    yield "edit: accepts the target (source read from pixels)", np.mean(
        [judge_edit(render(e.source), e.instruction(rng.choice(("en", "zh"))), blurred(render(e.target))).ok for e in edits])
    yield "edit: rejects the unchanged source", np.mean(
        [not judge_edit(render(e.source), e.instruction_en, render(e.source)).ok for e in edits])
    same, different = [], []
    for _ in range(count // 2):
        hero, other = random_character(rng), random_character(rng)
        refs = [reference_image(hero, rng)]
        for candidate, bucket in ((hero, same), (other, different)):
            free = [c for c in COLOURS if c not in candidate.colours | hero.colours]
            if free and not (candidate is other and other == hero):
                shot = noisy(render_characters(CharacterScene(rng.choice(free), ((candidate, "left"),))), 15)
                bucket.append(judge_character(refs, shot, "left").ok)
    yield "character: same identity accepted (noise 15)", np.mean(same)
    yield "character: different identity rejected (noise 15)", 1 - np.mean(different)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    for name, value in rows(args.count, args.seed):
        print(f"{name:<55} {value:7.1%}")
    print(f"({args.count} scenes, seed {args.seed}, {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
