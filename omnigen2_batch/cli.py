"""The command line: one small function per command, logic lives in the modules.

Heavy libraries (torch, diffusers, ray, open_clip) are imported inside the commands that need
them, so `validate`, `plan` and `status` answer in well under a second.
"""
from __future__ import annotations

import click


class InvalidInput(click.ClickException):
    """Bad input from the person (a recipe, a path, an option): exit 2, no traceback."""

    exit_code = 2


def load_plan(recipe: str, allow_paths=(), strict: bool = False, model: str | None = None):
    """Load, validate and plan RECIPE, or raise InvalidInput listing every problem."""
    from .plan import build_plan
    from .recipe import RecipeError, load_recipe

    try:
        return build_plan(load_recipe(recipe, allow_paths), model, strict)
    except RecipeError as err:
        count = f"{len(err.errors)} problem{'s' if len(err.errors) != 1 else ''}"
        raise InvalidInput(f"{recipe} is invalid ({count}):\n" +
                           "\n".join(f"  {line}" for line in err.errors)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="omnigen2-batch")
def main() -> None:
    """Batch image production with OmniGen2: recipes in, scored and kept images out."""


def recipe_options(command):
    """--allow-path and --strict, shared by the commands that read a recipe."""
    command = click.option("--strict", is_flag=True,
                           help="treat warnings about input images as errors")(command)
    return click.option("--allow-path", "allow_paths", multiple=True, metavar="DIR",
                        help="also allow recipe paths under DIR (repeatable)")(command)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@recipe_options
def validate(recipe: str, allow_paths: tuple[str, ...], strict: bool) -> None:
    """Check RECIPE and its input images; exit 0 when valid, 2 listing every problem."""
    plan = load_plan(recipe, allow_paths, strict)
    for warning in plan.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{recipe}: valid, {plan.estimate.jobs} jobs, {len(plan.warnings)} warnings")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
@click.option("--model", help="model to plan for instead of the recipe's (tiny, hub id, folder)")
@recipe_options
def plan(recipe: str, as_json: bool, model: str | None, allow_paths: tuple[str, ...],
         strict: bool) -> None:
    """List the jobs RECIPE makes (in run order) and what they will cost."""
    import json

    from .plan import describe_plan

    planned = load_plan(recipe, allow_paths, strict, model)
    for warning in planned.warnings:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        click.echo(json.dumps(planned.to_dict(), indent=2, ensure_ascii=False))
    else:
        click.echo(describe_plan(planned))


@main.command()
def schema() -> None:
    """Print the recipe JSON Schema (for editors and other tools)."""
    from .recipe import schema_text

    click.echo(schema_text(), nl=False)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="run directory (default: runs/<recipe name>)")
@click.option("--model", help="model instead of the recipe's: tiny, a hub id or a local folder")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="default: cuda when available")
@click.option("--batch-size", type=click.IntRange(1, 64), help="jobs per micro-batch (default: the recipe's)")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON (no progress bar)")
@click.option("--no-score", is_flag=True, help="keep every first attempt without CLIP scoring")
@click.option("--keep-attempts", is_flag=True, help="also keep every attempt's image")
@click.option("--executor", type=click.Choice(["local", "ray"]), help="default: the recipe's")
@click.option("--ray-address", help="join this Ray cluster (auto or host:port); default: a local Ray")
@click.option("--workers", type=click.IntRange(min=1), help="Ray actors (default: one per GPU)")
@click.option("--dashboard", is_flag=True, help="start the local Ray with its dashboard")
@recipe_options
def run(recipe: str, out: str | None, model: str | None, device: str | None, batch_size: int | None,
        as_json: bool, no_score: bool, keep_attempts: bool, executor: str | None,
        ray_address: str | None, workers: int | None, dashboard: bool, allow_paths: tuple[str, ...],
        strict: bool) -> None:
    """Make every job of RECIPE into --out, continuing where an earlier run stopped.

    Exit 0 when every job is kept, 1 when some were rejected or failed, 2 on invalid input,
    130 when interrupted (Ctrl-C finishes and commits the batch in flight first).
    """
    import json
    from pathlib import Path

    plan = load_plan(recipe, allow_paths, strict, model)
    from .executors.common import execute, worker_settings
    from .store import RunLocked, StoreError

    chosen = plan.settings
    settings = worker_settings(chosen, device=device, score=not no_score)
    executor = executor or chosen.executor
    if executor != "ray" and (ray_address or workers or dashboard):
        raise InvalidInput("--ray-address, --workers and --dashboard need --executor ray "
                           "(or executor: ray in the recipe)")
    ray = {"address": ray_address, "workers": workers, "dashboard": dashboard} if executor == "ray" else {}
    out = out or str(Path("runs") / chosen.name)
    for warning in plan.warnings:
        click.echo(f"warning: {warning}", err=True)
    try:
        summary = execute(plan, Path(recipe).read_bytes().decode("utf-8"), out, settings,
                          executor=executor, batch_size=batch_size or chosen.batch_size,
                          keep_attempts=keep_attempts or chosen.keep_attempts,
                          progress=not as_json, executor_options=ray)
    except RunLocked as err:
        raise InvalidInput(str(err)) from None
    except StoreError as err:  # e.g. the disk filled up while saving the recipe
        click.echo(f"error: {err}", err=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        click.echo("aborted; committed jobs are kept, `run` again to continue", err=True)
        raise SystemExit(130) from None
    if as_json:
        click.echo(json.dumps({"run_dir": str(Path(out).resolve()), **summary.to_dict()},
                              indent=2, ensure_ascii=False))
    else:
        _echo_summary(summary, out)
    raise SystemExit(summary.exit_code)


def _echo_summary(summary, out: str) -> None:
    click.echo(f"{out}: {summary.kept} kept, {summary.rejected} rejected, {summary.failed} failed, "
               f"{summary.pending} pending of {summary.total} jobs "
               f"({summary.ran} finished in this run, {summary.seconds:.1f} s)")
    for failure in summary.failures[:10]:
        click.echo(f"  failed {failure['section']}/{failure['name']}: {failure['error']}", err=True)
    if len(summary.failures) > 10:
        click.echo(f"  ... and {len(summary.failures) - 10} more failed jobs", err=True)
    if summary.error:
        click.echo(f"error: {summary.error}", err=True)
    if summary.interrupted:
        click.echo("interrupted: `run` the same recipe again to continue", err=True)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the counts as JSON")
def status(run_dir: str, as_json: bool) -> None:
    """Count RUN_DIR's jobs per state and per section (safe while a run is writing)."""
    import json

    from .store import RunStore, StoreError

    try:
        with RunStore.open(run_dir, readonly=True) as store:
            counts, meta = store.counts(), store.meta()
    except StoreError as err:
        raise InvalidInput(str(err)) from None
    if as_json:
        click.echo(json.dumps({"run_dir": run_dir, "recipe_name": meta.get("recipe_name"),
                               "model": meta.get("model"), **counts}, indent=2, ensure_ascii=False))
        return
    states = list(counts["status"])
    click.echo(f"{run_dir}: {meta.get('recipe_name', '?')}, model {meta.get('model', '?')}, "
               f"{counts['total']} jobs")
    width = max([len("section"), *map(len, counts["sections"])])
    click.echo(f"{'section':<{width}} " + " ".join(f"{s:>8}" for s in states))
    for section, by_state in counts["sections"].items():
        click.echo(f"{section:<{width}} " + " ".join(f"{by_state[s]:>8}" for s in states))
    click.echo(f"{'total':<{width}} " + " ".join(f"{counts['status'][s]:>8}" for s in states))


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--clip", "clip_model", help="open_clip model (default: the run's, else ViT-B-32)")
@click.option("--pretrained", help="open_clip pretrained tag or local weights file (default: the run's)")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... or auto")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def score(run_dir: str, clip_model: str | None, pretrained: str | None, device: str, as_json: bool) -> None:
    """Re-score RUN_DIR's outputs with CLIP and re-decide kept/rejected, without regenerating."""
    import json

    from .scoring import ClipScorer, ScorerError, rescore_run, run_clip_settings
    from .store import StoreError

    try:
        settings = run_clip_settings(run_dir, clip_model, pretrained, device)
        summary = rescore_run(run_dir, ClipScorer(**settings))
    except (StoreError, ScorerError) as err:
        raise InvalidInput(str(err)) from None
    if as_json:
        click.echo(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    weights = "RANDOM weights, scores are meaningless" if summary["random_weights"] else summary["pretrained"]
    click.echo(f"re-scored {summary['jobs']} jobs with {summary['clip_model']} ({weights}): "
               f"{summary['kept']} kept, {summary['rejected']} rejected, {len(summary['changed'])} changed")
    for change in summary["changed"]:
        click.echo(f"  {change['name']}: {change['from']} -> {change['to']}")
    for skipped in summary["skipped"]:
        click.echo(f"  skipped {skipped['job']}: {skipped['error']}", err=True)
    if summary["pairs"]:
        click.echo(f"bilingual pairs: {len(summary['pairs'])}, mean EN/ZH similarity "
                   f"{summary['similarity_mean']:.4f}, mean text gap {summary['text_gap_mean'] or 0:.4f}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--open", "open_browser", is_flag=True, help="open the report in the default browser")
def report(run_dir: str, open_browser: bool) -> None:
    """Write RUN_DIR/report.html (thumbnails in thumbs/, contact sheets in sheets/)."""
    import webbrowser

    from .report import ReportError, write_report

    try:
        page = write_report(run_dir)
    except ReportError as err:
        raise InvalidInput(str(err)) from None
    click.echo(str(page))
    if open_browser:
        webbrowser.open(page.as_uri())
