"""Calibrate CLIP thresholds: print score distributions (percentiles) and suggest thresholds.

Two sources:
  --images DIR --prompts FILE   score a folder of images against their prompts with CLIP.
      FILE lines are "name.png<TAB>prompt", or plain prompts matched to the images in sorted
      file-name order. Each image is also scored against another image's prompt (a rolled
      pairing), a negative control: the suggested `text` threshold is the cut that best separates
      matched from mismatched pairs (highest balanced accuracy).
  --run RUN_DIR                 the scores a run recorded for every attempt (no model needed).
      The suggestion per metric is the --percentile of the scores (default 10: about 90% pass).

  python evaluation/calibrate_scorer.py --images out/ --prompts prompts.txt --clip ViT-B-32 --pretrained openai
  python evaluation/calibrate_scorer.py --run runs/demo --percentile 20 --json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PERCENTILES = (5, 10, 25, 50, 75, 90, 95)
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
    args = parser.parse_args(argv)
    if args.images and not args.prompts:
        parser.error("--images needs --prompts")
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
