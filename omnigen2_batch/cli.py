"""The command line: one small function per command; the logic lives in the modules, and
console.py turns each command's Reply (or error) into output and an exit code.

Heavy libraries (torch, diffusers, ray, open_clip) are imported inside the commands that need
them, so `validate`, `plan` and `status` answer in well under a second.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import click

from .console import BatchCli, Reply
from .errors import UnavailableError, UserError


# ---------------------------------------------------------------------------------- helpers
def load_plan(recipe: str, allow_paths=(), strict: bool = False, model: str | None = None,
              overrides: tuple[str, ...] = (), transformer: str | None = None):
    """Load, validate and plan RECIPE; raises RecipeError (a UserError) listing every problem."""
    from .plan import build_plan
    from .recipe import load_recipe

    return build_plan(load_recipe(recipe, allow_paths, overrides), model, strict, transformer)


def recipe_options(command):
    """--allow-path, --strict and --set, shared by the commands that read a recipe."""
    command = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                           help="override a recipe value, e.g. defaults.steps=4 (repeatable)")(command)
    command = click.option("--strict", is_flag=True,
                           help="treat warnings about input images as errors")(command)
    return click.option("--allow-path", "allow_paths", multiple=True, metavar="DIR",
                        help="also allow recipe paths under DIR (repeatable)")(command)


def json_option(command):
    return click.option("--json", "as_json", is_flag=True,
                        help="answer with one JSON document on stdout (also on failure)")(command)


@click.group(cls=BatchCli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="omnigen2-batch")
@click.option("-v", "--verbose", is_flag=True, help="also print informational messages")
def main(verbose: bool) -> None:
    """Batch image production with OmniGen2: recipes in, scored and kept images out."""


# ---------------------------------------------------------------------------------- commands
TRANSFORMER_HELP = ("replace the model's transformer: a folder or a .safetensors file "
                    "(default: the recipe's; part of every job's id)")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--deep", is_flag=True, help="also check that the model and the scorer's weights "
                                           "are on this machine (imports torch)")
@json_option
@recipe_options
def validate(recipe: str, deep: bool, as_json: bool, allow_paths, strict: bool, overrides) -> Reply:
    """Check RECIPE and its input images; exit 0 when valid, 2 listing every problem
    (3 with --deep when this machine lacks the model or the scorer's weights)."""
    plan = load_plan(recipe, allow_paths, strict, overrides=overrides)
    if deep:
        from .preflight import preflight

        preflight(plan.config)
    text = f"{recipe}: valid, {plan.estimate.jobs} jobs, {len(plan.warnings)} warnings"
    return Reply({"recipe": recipe, "jobs": plan.estimate.jobs, "warnings": plan.warnings,
                  "deep": deep}, text, notes=[f"warning: {w}" for w in plan.warnings])


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--model", help="model to plan for instead of the recipe's (tiny, hub id, folder)")
@click.option("--transformer", metavar="PATH", help=TRANSFORMER_HELP)
@json_option
@recipe_options
def plan(recipe: str, model: str | None, transformer: str | None, as_json: bool, allow_paths,
         strict: bool, overrides) -> Reply:
    """List the jobs RECIPE makes (in run order) and what they will cost."""
    from .plan import describe_plan

    planned = load_plan(recipe, allow_paths, strict, model, overrides, transformer)
    return Reply(planned.to_dict(), describe_plan(planned),
                 notes=[f"warning: {w}" for w in planned.warnings])


@main.command()
def schema() -> Reply:
    """Print the recipe JSON Schema (for editors and other tools)."""
    from .recipe import json_schema, schema_text

    return Reply(json_schema(), schema_text().rstrip("\n"))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="run directory (default: runs/<recipe name>)")
@click.option("--model", help="model instead of the recipe's: tiny, a hub id or a local folder")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="default: auto (CUDA when there is one)")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), help="default: the recipe's")
@click.option("--offload", type=click.Choice(["none", "model", "sequential", "group"]), help="default: the recipe's")
@click.option("--transformer", metavar="PATH", help=TRANSFORMER_HELP)
@click.option("--compile/--no-compile", "compile_", default=None,
              help="torch.compile the transformer's blocks (default: the recipe's)")
@click.option("--batch-size", type=click.IntRange(1, 64), help="jobs per micro-batch (default: the recipe's)")
@click.option("--no-score", is_flag=True, help="keep every first attempt without CLIP scoring")
@click.option("--keep-attempts", is_flag=True, help="also keep every attempt's image")
@click.option("--min-kept", metavar="N|P%",
              help="exit 0 once at least N jobs (or P% of them) are kept, rejections allowed; default: every job")
@click.option("--executor", type=click.Choice(["local", "ray"]), help="default: the recipe's")
@click.option("--ray-address", help="join this Ray cluster (auto or host:port); default: a local Ray")
@click.option("--workers", type=click.IntRange(min=1), help="Ray actors (default: one per GPU)")
@click.option("--dashboard", is_flag=True, help="start the local Ray with its dashboard")
@json_option
@recipe_options
def run(recipe: str, out: str | None, model, device, dtype, offload, transformer, compile_,
        batch_size, no_score: bool, keep_attempts: bool, min_kept: str | None, executor,
        ray_address, workers, dashboard: bool, as_json: bool, allow_paths, strict: bool,
        overrides) -> Reply:
    """Make every job of RECIPE into --out, continuing where an earlier run stopped.

    Exit 0 when every job is kept (with --min-kept: at least that many); 1 when fewer were; 2 on invalid input or a run directory in use or not this recipe's;
    3 when this machine cannot run it (model, scorer weights, device, cluster); 130 on Ctrl-C
    (the batch in flight is finished first); 143 on SIGTERM (the batch in flight is dropped).
    """
    from .config import RayConfig
    from .preflight import preflight
    from .progress import Progress
    from .recipe import read_recipe_bytes
    from .run import execute

    plan = load_plan(recipe, allow_paths, strict, model, overrides, transformer)
    config = plan.config.with_(device=device, dtype=dtype, offload=offload, compile=compile_,
                               executor=executor, batch_size=batch_size,
                               keep_attempts=keep_attempts or None,
                               score=False if no_score else None)
    if problem := config.compile_problem():
        raise UserError(f"--compile: {problem}")
    if config.executor != "ray" and (ray_address or workers or dashboard):
        raise UserError("--ray-address, --workers and --dashboard need --executor ray "
                        "(or executor: ray in the recipe)")
    if config.executor == "ray":
        config = config.with_(ray=RayConfig(ray_address, workers, dashboard))
    for warning in plan.warnings:
        click.echo(f"warning: {warning}", err=True)
    preflight(config)
    out = out or str(Path("runs") / plan.name)
    summary = execute(plan, config, out, recipe_text=read_recipe_bytes(Path(recipe)).decode("utf-8"),
                      recipe_origin=Path(recipe).name, progress=Progress(enabled=not as_json),
                      min_kept=_min_kept(min_kept, len(plan.jobs)))
    return Reply({"run_dir": str(Path(out).resolve()), **summary.to_dict()},
                 _summary_text(summary, out), summary.exit_code, _summary_notes(summary))


def _min_kept(value: str | None, total: int) -> int | None:
    """--min-kept N or P% -> a number of jobs (None: every job must be kept)."""
    if value is None:
        return None
    match = re.fullmatch(r"(\d+)(%?)", value.strip())
    if not match or (match[2] and int(match[1]) > 100):
        raise UserError(f"--min-kept {value!r}: expected a number of jobs (e.g. 40) or a "
                        "percentage up to 100% (e.g. 90%)")
    count = int(match[1])
    return -(-count * total // 100) if match[2] else count


def _summary_text(summary, out: str) -> str:
    lines = [f"{out}: {summary.kept} kept, {summary.rejected} rejected, {summary.failed} failed, "
             f"{summary.pending} pending of {summary.total} jobs "
             f"({summary.ran} finished in this run, {summary.seconds:.1f} s)"]
    if summary.superseded:
        lines.append(f"  {summary.superseded} jobs no longer in the recipe were set aside "
                     "under superseded/ (`prune` deletes them)")
    if summary.redecided:
        lines.append(f"  {summary.redecided} finished jobs were re-decided with the recipe's "
                     "current thresholds")
    return "\n".join(lines)


def _summary_notes(summary) -> list[str]:
    notes = [f"  failed {f['section']}/{f['name']}: {f['error']}" for f in summary.failures[:10]]
    if len(summary.failures) > 10:
        notes.append(f"  ... and {len(summary.failures) - 10} more failed jobs")
    if summary.min_kept is not None and summary.kept < summary.min_kept:
        notes.append(f"error: only {summary.kept} jobs kept, fewer than --min-kept {summary.min_kept}")
    if summary.error:
        notes.append(f"error: {summary.error}")
    if summary.interrupted:
        notes.append(f"stopped by {summary.stopped_by}: `run` the same recipe again to continue")
    return notes


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@json_option
def status(run_dir: str, as_json: bool) -> Reply:
    """Count RUN_DIR's jobs per state and per section (safe while a run is writing)."""
    from .store import RunStore

    with RunStore.open(run_dir, readonly=True) as store:
        counts, meta = store.counts(), store.meta()
    doc = {"run_dir": run_dir, "recipe_name": meta.get("recipe_name"), "model": meta.get("model"),
           **counts}
    return Reply(doc, _status_table(run_dir, counts, meta))


def _status_table(run_dir: str, counts: dict, meta: dict) -> str:
    states = list(counts["status"])
    lines = [f"{run_dir}: {meta.get('recipe_name', '?')}, model {meta.get('model', '?')}, "
             f"{counts['total']} jobs"]
    width = max([len("section"), *map(len, counts["sections"])])
    lines.append(f"{'section':<{width}} " + " ".join(f"{s:>8}" for s in states))
    for section, by_state in counts["sections"].items():
        lines.append(f"{section:<{width}} " + " ".join(f"{by_state[s]:>8}" for s in states))
    lines.append(f"{'total':<{width}} " + " ".join(f"{counts['status'][s]:>8}" for s in states))
    if counts.get("superseded"):
        lines.append(f"({counts['superseded']} superseded jobs of earlier recipes are not counted)")
    return "\n".join(lines)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@json_option
def prune(run_dir: str, as_json: bool) -> Reply:
    """Delete the work of jobs the recipe no longer has (set aside under superseded/ by `run`).
    Only files the engine wrote and recorded are removed; nothing else is touched."""
    from .store import RunStore

    with RunStore.open(run_dir) as store:
        pruned = store.prune()
    return Reply(pruned, f"{run_dir}: deleted {pruned['jobs']} superseded jobs and "
                         f"{len(pruned['removed'])} of their files")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--clip", "clip_model", help="open_clip model (default: the run's)")
@click.option("--pretrained", help="open_clip pretrained tag or local weights file (default: the run's)")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... or auto")
@json_option
def score(run_dir: str, clip_model: str | None, pretrained: str | None, device: str,
          as_json: bool) -> Reply:
    """Re-score RUN_DIR's outputs with CLIP and re-decide kept/rejected, without regenerating."""
    from .preflight import clip_problems
    from .rescore import rescore_run
    from .scoring import ClipScorer
    from .worker import resolve_device

    clip = _run_clip(run_dir, clip_model, pretrained)
    problems = clip_problems(clip)
    if problems:
        raise UnavailableError("\n".join(problems), errors=problems)
    summary = rescore_run(run_dir, ClipScorer(clip.model, clip.pretrained, resolve_device(device),
                                              clip.multilingual))
    return Reply(summary, _score_text(summary),
                 notes=[f"  skipped {s['job']}: {s['error']}" for s in summary["skipped"]])


def _run_clip(run_dir: str, model: str | None, pretrained: str | None):
    """The run's own CLIP, with the given choices over it."""
    from .config import ClipConfig, RunConfig
    from .store import RunStore

    with RunStore.open(run_dir, readonly=True) as store:
        clip = RunConfig.from_dict(json.loads(store.get_meta("config") or "{}")).clip
    if model:  # another architecture: the run's weights cannot fit it
        return ClipConfig(model, pretrained, clip.multilingual)
    return ClipConfig(clip.model, pretrained or clip.pretrained, clip.multilingual)


def _score_text(summary: dict) -> str:
    weights = ("RANDOM weights, scores are meaningless" if summary["random_weights"]
               else summary["pretrained"])
    lines = [f"re-scored {summary['jobs']} jobs with {summary['clip_model']} ({weights}): "
             f"{summary['kept']} kept, {summary['rejected']} rejected, "
             f"{len(summary['changed'])} changed"]
    lines += [f"  {c['name']}: {c['from']} -> {c['to']}" for c in summary["changed"]]
    if summary["pairs"]:
        lines.append(f"bilingual pairs: {len(summary['pairs'])}, mean EN/ZH similarity "
                     f"{summary['similarity_mean']:.4f}, mean text gap "
                     f"{summary['text_gap_mean'] or 0:.4f}")
    return "\n".join(lines)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--open", "open_browser", is_flag=True, help="open the report in the default browser")
@json_option
def report(run_dir: str, open_browser: bool, as_json: bool) -> Reply:
    """Write RUN_DIR/report.html (thumbnails in thumbs/, contact sheets in sheets/)."""
    from .report import write_report

    page = write_report(run_dir)
    if open_browser:
        import webbrowser

        webbrowser.open(page.as_uri())
    return Reply({"report": str(page)}, str(page))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("dest", type=click.Path())
@click.option("--picked", is_flag=True, help="only the images marked with `omnigen2-batch pick`")
@click.option("--force", is_flag=True, help="write into a non-empty DEST folder, replacing only "
                                            "the files this export writes")
@json_option
def export(run_dir: str, dest: str, picked: bool, force: bool, as_json: bool) -> Reply:
    """Copy RUN_DIR's kept images to DEST (a folder, or a file ending in .zip) under flat unique
    names, with manifest.jsonl and manifest.csv describing each one.

    Exit 0 when every kept image was exported, 1 when some could not be (each is listed) or the
    disk filled up, 2 on bad input (not a run dir, DEST inside it, DEST not empty).
    """
    from .export import export_run

    result = export_run(run_dir, dest, picked=picked, force=force)
    text = f"{result.dest}: exported {len(result.records)} of {result.kept} kept images"
    notes = [f"  not exported {p['section']}/{p['name']}: {p['error']}" for p in result.problems]
    return Reply(result.to_dict(), text, result.exit_code, notes)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("images", nargs=-1, required=True)
@click.option("--clear", is_flag=True, help="forget earlier picks first")
@json_option
def pick(run_dir: str, images: tuple[str, ...], clear: bool, as_json: bool) -> Reply:
    """Mark kept IMAGES of RUN_DIR as picked, for `export --picked`. An IMAGE is a kept file,
    or a job id (8+ characters) with an optional variant: 3f2a9c01, 3f2a9c01:v2."""
    from .picks import pick_images

    picks = pick_images(run_dir, list(images), clear=clear)
    return Reply({"picks": picks}, f"{run_dir}: {len(picks)} picked images")


if __name__ == "__main__":  # python -m omnigen2_batch.cli ...
    main()
