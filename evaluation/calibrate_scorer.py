"""Calibrate CLIP thresholds: print score distributions (percentiles) and suggest thresholds.

Two sources:
  --images DIR --prompts FILE   score a folder of images against their prompts with CLIP.
      FILE lines are "name.png<TAB>prompt", or plain prompts matched to the images in sorted
      file-name order. Each image is also scored against another image's prompt (a rolled
      pairing), a negative control: the suggested `text` threshold is the cut that best separates
      matched from mismatched pairs (highest balanced accuracy).
  --run RUN_DIR                 the scores a run recorded for every attempt (no model needed).
      The suggestion per metric is the --percentile of the scores (default 10: about 90% pass).
  --run RUN_DIR --toy           a toy-model run made with every attempt kept (toy_eval.py): each
      attempt image is judged from pixels, and per job kind the suggestion for each metric the
      ladder uses is the cut that best separates judged-right from judged-wrong images.
      --write-toy-thresholds stores them beside the toy weights (thresholds.json), where
      `model: toy` recipes take their default thresholds from; metrics whose ROC AUC is below
      0.6 are left out (a threshold that cannot tell right from wrong only rejects good work).

  python evaluation/calibrate_scorer.py --images out/ --prompts prompts.txt --clip ViT-B-32 --pretrained openai
  python evaluation/calibrate_scorer.py --run runs/demo --percentile 20 --json
  python evaluation/toy_eval.py --count 48 --seed 1 --no-ladder --out /tmp/toy-cal && \
  python evaluation/calibrate_scorer.py --run /tmp/toy-cal/run --toy --write-toy-thresholds
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PERCENTILES = (5, 10, 25, 50, 75, 90, 95)
MIN_AUC = 0.6  # below this a toy threshold is left out
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile of a non-empty list."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def best_separation(matched: list[float], mismatched: list[float]) -> tuple[float, float]:
    """(threshold, balanced accuracy) of the cut that best separates the two score sets."""
    best = (0.0, -1.0)
    for cut in sorted(set(matched + mismatched)):
        tpr = sum(v >= cut for v in matched) / len(matched)
        tnr = sum(v < cut for v in mismatched) / len(mismatched)
        if (tpr + tnr) / 2 > best[1]:
            best = (cut, (tpr + tnr) / 2)
    return best


def read_pairs(images_dir: Path, prompts_file: Path) -> list[tuple[Path, str]]:
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    lines = [line for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if lines and all("\t" in line for line in lines):
        return [(images_dir / name, prompt) for name, prompt in (line.split("\t", 1) for line in lines)]
    if len(lines) != len(images):
        sys.exit(f"{prompts_file}: {len(lines)} prompts for {len(images)} images in {images_dir}; give one "
                 "prompt per image (sorted by file name) or 'name.png<TAB>prompt' lines")
    return list(zip(images, lines))


def folder_scores(pairs: list[tuple[Path, str]], clip: str, pretrained: str | None) -> dict:
    from omnigen2_batch.images import load_rgb
    from omnigen2_batch.scoring import ClipScorer

    scorer = ClipScorer(clip, pretrained)
    images = scorer.embed_images([load_rgb(path) for path, _ in pairs])
    texts = scorer.embed_texts([prompt for _, prompt in pairs])
    sims = images @ texts.T
    matched = [float(sims[i, i]) for i in range(len(pairs))]
    mismatched = [float(sims[i, (i + 1) % len(pairs)]) for i in range(len(pairs))] if len(pairs) > 1 else []
    return {"scores": {"text": matched, "clipscore": [100 * max(v, 0.0) for v in matched]},
            "mismatched_text": mismatched, "random_weights": scorer.random_weights}


def run_scores(run_dir: Path) -> dict:
    from omnigen2_batch.config import RunConfig
    from omnigen2_batch.store import RunStore

    scores: dict[str, list[float]] = {}
    with RunStore.open(run_dir, readonly=True) as store:
        for row in store.jobs():
            for attempt in store.attempts(row["id"]):
                for metric, value in (attempt["scores"] or {}).items():
                    scores.setdefault(metric, []).append(value)
        config = RunConfig.from_dict(json.loads(store.get_meta("config") or "{}"))
    return {"scores": scores, "mismatched_text": [], "random_weights": config.clip.random_weights}


def toy_suggestions(run_dir: Path) -> dict:
    """kind -> metric -> the best cut between judged-right and judged-wrong attempt images."""
    sys.path.insert(0, str(Path(__file__).parent))
    from toy_eval import LADDER_METRICS, judged_attempts, roc_auc

    judged, found = judged_attempts(run_dir), {}
    for kind, metrics in LADDER_METRICS.items():
        for metric in metrics:
            right = [j.scores[metric] for j in judged if j.kind == kind and metric in j.scores and j.ok]
            wrong = [j.scores[metric] for j in judged if j.kind == kind and metric in j.scores and not j.ok]
            if right and wrong:
                cut, accuracy = best_separation(right, wrong)
                found.setdefault(kind, {})[metric] = {
                    "threshold": cut, "balanced_accuracy": accuracy, "auc": roc_auc(right, wrong),
                    "judged_right": len(right), "judged_wrong": len(wrong)}
    return found


def write_toy_thresholds(found: dict, command: str) -> Path:
    from omnigen2_batch.config import TOY_DIR

    chosen = {kind: {metric: round(row["threshold"], 4) for metric, row in metrics.items() if row["auc"] >= MIN_AUC}
              for kind, metrics in found.items()}
    record = {"_made_by": command, "_measured": found, **{k: v for k, v in chosen.items() if v}}
    path = TOY_DIR / "thresholds.json"
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


def print_toy(found: dict) -> None:
    print(f"{'kind':<11}{'metric':<16}{'right':>6}{'wrong':>6}{'AUC':>8}{'cut':>9}{'bal.acc':>9}")
    for kind, metrics in found.items():
        for metric, row in metrics.items():
            print(f"{kind:<11}{metric:<16}{row['judged_right']:>6}{row['judged_wrong']:>6}{row['auc']:>8.3f}"
                  f"{row['threshold']:>9.4f}{row['balanced_accuracy']:>9.3f}")


def summarise(data: dict, q: float) -> dict:
    table = {metric: {f"p{p}": percentile(values, p) for p in PERCENTILES} | {"n": len(values)}
             for metric, values in data["scores"].items() if values}
    suggested = {metric: percentile(values, q) for metric, values in data["scores"].items() if values}
    separation = None
    if data["mismatched_text"]:
        cut, accuracy = best_separation(data["scores"]["text"], data["mismatched_text"])
        suggested["text"], separation = cut, {"threshold": cut, "balanced_accuracy": accuracy}
        suggested["clipscore"] = 100 * max(cut, 0.0)
    return {"percentiles": table, "suggested_thresholds": suggested, "separation": separation,
            "random_weights": data["random_weights"]}


def print_summary(summary: dict, q: float) -> None:
    if summary["random_weights"]:
        print("WARNING: random CLIP weights: these figures say nothing about image quality")
    print(f"{'metric':<18}{'n':>6}" + "".join(f"{'p' + str(p):>9}" for p in PERCENTILES))
    for metric, row in summary["percentiles"].items():
        print(f"{metric:<18}{row['n']:>6}" + "".join(f"{row['p' + str(p)]:>9.4f}" for p in PERCENTILES))
    if summary["separation"]:
        sep = summary["separation"]
        print(f"\nmatched vs mismatched prompts: best cut text >= {sep['threshold']:.4f} "
              f"(balanced accuracy {sep['balanced_accuracy']:.3f})")
    print(f"\nsuggested thresholds (p{q:g} of the scores, or the best cut for text):")
    for metric, value in summary["suggested_thresholds"].items():
        print(f"  {metric}: {value:.4f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="folder of images (needs --prompts)")
    source.add_argument("--run", type=Path, help="a run directory: use its recorded scores")
    parser.add_argument("--prompts", type=Path, help="prompts file for --images")
    parser.add_argument("--clip", default="ViT-B-32", help="open_clip model for --images")
    parser.add_argument("--pretrained", help="open_clip tag or local weights (default: random, meaningless)")
    parser.add_argument("--percentile", type=float, default=10.0, help="suggested threshold percentile")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--toy", action="store_true", help="with --run: judge a toy run's attempts from pixels")
    parser.add_argument("--write-toy-thresholds", action="store_true", help="with --toy: store them for model: toy")
    args = parser.parse_args(argv)
    if args.images and not args.prompts:
        parser.error("--images needs --prompts")
    if args.toy:
        if not args.run:
            parser.error("--toy needs --run RUN_DIR")
        found = toy_suggestions(args.run)
        if args.json:
            print(json.dumps(found, indent=2))
        else:
            print_toy(found)
        if args.write_toy_thresholds:
            command = "python evaluation/calibrate_scorer.py " + " ".join(sys.argv[1:] if argv is None else argv)
            print(f"wrote {write_toy_thresholds(found, command)}")
        return
    data = run_scores(args.run) if args.run else folder_scores(
        read_pairs(args.images, args.prompts), args.clip, args.pretrained)
    if not any(data["scores"].values()):
        sys.exit("no scores found: was the run made with --no-score? run `omnigen2-batch score` first")
    summary = summarise(data, args.percentile)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary, args.percentile)


if __name__ == "__main__":
    main()
