"""The toy model measured through the real engine, on held-out combinations and unseen seeds.

    python evaluation/toy_eval.py [--count 24] [--seed 2] [--out DIR] [--no-ladder] [--json]
                                  [--write-figures]

Writes one recipe of the toy world (bilingual t2i pairs of held-out colour x shape x background
combinations, edits whose targets are held out, in-context shots of freshly drawn characters;
edits and shots alternate EN/ZH), runs it with `omnigen2_batch.run.execute` exactly as
`omnigen2-batch run` would (toy model, toy CLIP, its calibrated thresholds, the ladder, every
attempt kept), then judges every attempt image from pixels (omnigen2_batch/toy/judge.py) and
prints one table:
- accuracy of first attempts: t2i all attributes EN / ZH / gap, edits, in-context identity;
- toy-CLIP agreement with the judge: ROC AUC of each metric the ladder thresholds, per kind;
- the ladder: judge accuracy of the kept images vs of first attempts, false keeps (kept, judged
  wrong) and false rejects (judged right, failed the thresholds).
--no-ladder: one attempt per job (for calibrate_scorer.py --toy). --write-figures: store the
headline in the toy model's figures.json, which the report's toy banner shows.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnigen2_batch.config import TOY_DIR  # noqa: E402
from omnigen2_batch.jobs import Job  # noqa: E402
from omnigen2_batch.toy.captions import DETAILS, caption  # noqa: E402
from omnigen2_batch.toy.characters import make_incontext_task  # noqa: E402
from omnigen2_batch.toy.edits import EditError, make_edit  # noqa: E402
from omnigen2_batch.toy.scenes import SPLITS, render, sample_scene  # noqa: E402

# The metrics the ladder thresholds for each kind (those calibrate_scorer.py --toy calibrates).
LADDER_METRICS = {"t2i": ("text",), "edit": ("preservation", "direction"), "incontext": ("consistency_min",)}
SEED_OFFSET = 10_000  # recipe seeds far from anything the training script drew


@dataclass
class Judged:
    """One attempt image of the run, with its scores and the pixel judge's verdict."""

    job_id: str
    kind: str
    lang: str
    n: int
    scores: dict
    passed: bool  # met the thresholds
    ok: bool  # the judge's verdict
    identity_ok: bool  # in-context: every character right (background aside)
    final: bool  # the image the job ended with (kept or rejected)
    status: str  # the job's
    checks: dict  # the judge's verdict per attribute


# -- the recipe --------------------------------------------------------------------------------

def held_out_edit(rng: random.Random):
    """An edit whose target holds a held-out combination and at least one object."""
    while True:
        source = sample_scene(rng, rng.choice(SPLITS), rng.randint(1, 2))
        try:
            edit = make_edit(rng, source, split="eval")
        except EditError:
            continue
        if edit.target.objects:
            return edit


def build_recipe(count: int, seed: int, ladder: bool, folder: Path) -> dict:
    """The evaluation recipe; its input images are written under folder/inputs."""
    rng = random.Random(seed)
    (folder / "inputs").mkdir(parents=True, exist_ok=True)
    pairs, seen = [], set()
    while len(pairs) < count:  # distinct prompts: the same prompt twice would be the same job
        scene = sample_scene(rng, "eval", 1)
        detail = DETAILS[len(pairs) % 2]  # short captions ("a red circle on a blue background") and full ones
        en, zh = caption(scene, "en", detail, rng.randrange(4)), caption(scene, "zh", detail, rng.randrange(4))
        if en not in seen and zh not in seen:
            seen |= {en, zh}
            pairs.append({"name": f"s{len(pairs)}", "en": en, "zh": zh})
    edits = []
    for i in range(count):
        edit = held_out_edit(rng)
        render(edit.source).save(folder / "inputs" / f"e{i}.png")
        edits.append({"name": f"e{i}", "inputs": [f"inputs/e{i}.png"], "instructions": [{
            "instruction": edit.instruction("zh" if i % 2 else "en"),
            "source_caption": caption(edit.source, "en", "full"),
            "target_caption": caption(edit.target, "en", "full")}]})
    characters, series = {}, []
    for i in range(count):
        task = make_incontext_task(rng, subjects=rng.choice((1, 2)))
        names = [f"c{i}{'ab'[k]}" for k in range(len(task.references))]
        for name, image in zip(names, task.references):
            image.save(folder / "inputs" / f"{name}.png")
            characters[name] = {"references": [f"inputs/{name}.png"]}
        series.append({"name": f"c{i}", "characters": names, "shots": [task.instruction("zh" if i % 2 else "en")]})
    return {"name": "toy-eval", "model": "toy", "keep_attempts": True, "batch_size": 8,
            "defaults": {"seed": SEED_OFFSET + seed, "max_attempts": 3 if ladder else 1},
            "bilingual": [{"name": "t2i", "pairs": pairs}], "edits": edits,
            "characters": characters, "series": series}


def run_recipe(recipe: dict, folder: Path) -> Path:
    """Run the recipe as `omnigen2-batch run` does; returns the run directory."""
    import yaml

    from omnigen2_batch.plan import build_plan
    from omnigen2_batch.preflight import preflight
    from omnigen2_batch.recipe import load_recipe
    from omnigen2_batch.run import execute

    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True, sort_keys=False), encoding="utf-8")
    plan = build_plan(load_recipe(path))
    preflight(plan.config)
    execute(plan, plan.config, folder / "run", recipe_text=path.read_text(encoding="utf-8"))
    return folder / "run"


# -- judging a run -----------------------------------------------------------------------------

def judged_attempts(run_dir: Path) -> list[Judged]:
    """Every attempt image of a run (made with keep_attempts), judged from pixels."""
    from omnigen2_batch.images import load_rgb
    from omnigen2_batch.store import RunStore
    from omnigen2_batch.toy.judge import judge_job

    judged = []
    with RunStore.open(run_dir, readonly=True) as store:
        for row in store.jobs():
            job = Job.from_dict(row["job"])
            inputs = [load_rgb(ref.path) for ref in job.inputs]
            for attempt in store.attempts(row["id"]):
                if not attempt["image"]:
                    continue
                verdict = judge_job(job.kind, job.prompt, inputs, load_rgb(run_dir / attempt["image"]))
                identity = all(v for k, v in verdict.checks.items() if k.startswith("character"))
                judged.append(Judged(job.id, job.kind, job.lang, attempt["n"], attempt["scores"] or {},
                                     bool(attempt["passed"]), verdict.ok, identity,
                                     attempt["n"] == row["best"], row["status"], verdict.checks))
    return judged


def roc_auc(positives: list[float], negatives: list[float]) -> float | None:
    """P(a judged-right image scores above a judged-wrong one), ties counting half."""
    if not positives or not negatives:
        return None
    wins = sum((p > q) + 0.5 * (p == q) for p in positives for q in negatives)
    return wins / (len(positives) * len(negatives))


def share(flags) -> float | None:
    flags = list(flags)
    return sum(map(bool, flags)) / len(flags) if flags else None


def figures_of(judged: list[Judged]) -> dict:
    first = [j for j in judged if j.n == 0]
    rows = {
        "t2i EN (all attributes)": share(j.ok for j in first if j.kind == "t2i" and j.lang == "en"),
        "t2i ZH (all attributes)": share(j.ok for j in first if j.kind == "t2i" and j.lang == "zh"),
        "edit success": share(j.ok for j in first if j.kind == "edit"),
        "in-context identity": share(j.identity_ok for j in first if j.kind == "incontext"),
        "in-context identity + background": share(j.ok for j in first if j.kind == "incontext"),
    }
    en, zh = rows["t2i EN (all attributes)"], rows["t2i ZH (all attributes)"]
    rows["t2i EN - ZH gap"] = en - zh if en is not None and zh is not None else None
    for attribute in ("background", "count", "colour", "shape", "position", "size"):  # where it fails
        # over the captions that state it: short ones leave position and size open
        rows[f"  t2i {attribute} right"] = share(j.checks[attribute] for j in first
                                                 if j.kind == "t2i" and attribute in j.checks)
    auc = {}
    for kind, metrics in LADDER_METRICS.items():
        for metric in metrics:
            scored = [j for j in judged if j.kind == kind and metric in j.scores]
            auc[f"AUC {kind} {metric}"] = roc_auc([j.scores[metric] for j in scored if j.ok],
                                                  [j.scores[metric] for j in scored if not j.ok])
    final = [j for j in judged if j.final]
    kept = [j for j in final if j.status == "kept"]
    right = [j for j in judged if j.ok]
    ladder = {"first attempts judged right": share(j.ok for j in first),
              "kept images judged right": share(j.ok for j in kept),
              "jobs kept": share(j.status == "kept" for j in final),
              "false keeps (kept, judged wrong)": share(not j.ok for j in kept),
              "false rejects (judged right, failed thresholds)": share(not j.passed for j in right)}
    if ladder["kept images judged right"] is not None and ladder["first attempts judged right"] is not None:
        ladder["ladder lift (points)"] = 100 * (ladder["kept images judged right"] - ladder["first attempts judged right"])
    counts = {"jobs": len(final), "attempt images": len(judged)}
    return {"accuracy": rows, "agreement": auc, "ladder": ladder, "counts": counts}


TARGETS = {"t2i EN (all attributes)": ">= 90 %", "t2i ZH (all attributes)": ">= 85 %", "edit success": ">= 80 %",
           "in-context identity": ">= 75 %", "ladder lift (points)": ">= 10",
           "false keeps (kept, judged wrong)": "<= 5 %"}


def print_table(figures: dict) -> None:
    for block, rows in figures.items():
        print(f"\n{block}")
        for name, value in rows.items():
            target = TARGETS.get(name, ">= 0.9" if name.startswith("AUC") else "")
            if value is None:
                shown = "n/a"
            elif "points" in name or block == "counts":
                shown = f"{value:.0f}"
            elif name.startswith("AUC"):
                shown = f"{value:.3f}"
            else:
                shown = f"{100 * value:.1f} %"
            print(f"  {name:<50}{shown:>10}   {target}")


def headline(figures: dict) -> str:
    """One line for the report's toy banner."""
    a = figures["accuracy"]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.0f} %"  # noqa: E731
    return (f"text-to-image {pct(a['t2i EN (all attributes)'])} EN / {pct(a['t2i ZH (all attributes)'])} ZH "
            f"with every attribute right, edits {pct(a['edit success'])}, in-context identity "
            f"{pct(a['in-context identity'])} (first attempts)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=24, help="t2i pairs, edits and in-context shots (each)")
    parser.add_argument("--seed", type=int, default=2, help="draws the scenes and the recipe's seed")
    parser.add_argument("--out", type=Path, default=Path("runs/toy-eval"), help="work folder (recipe, inputs, run)")
    parser.add_argument("--no-ladder", action="store_true", help="one attempt per job (for calibration)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--write-figures", action="store_true", help=f"write the headline to {TOY_DIR}/figures.json")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"--out {args.out}: folder exists and is not empty; pass a new folder")
    start = time.perf_counter()
    run_dir = run_recipe(build_recipe(args.count, args.seed, not args.no_ladder, args.out), args.out)
    figures = figures_of(judged_attempts(run_dir))
    figures["counts"]["seconds"] = time.perf_counter() - start
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print_table(figures)
        print(f"\n({args.count} per row, seed {args.seed}, run in {run_dir})")
    if args.write_figures:
        record = {"headline": headline(figures), "figures": figures,
                  "command": "python evaluation/toy_eval.py " + " ".join(sys.argv[1:] if argv is None else argv)}
        (TOY_DIR / "figures.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
