"""How a command answers: a Reply (what --json prints, what a person reads, the exit code),
and the one handler (BatchCli.main) that turns replies and errors into output and exit codes,
so every command fails the same way: a message naming the file, field and what to do, the
exit code errors.py defines, and with --json one JSON document on stdout, failures included.
Also: stdout kept clean for --json, and each warning printed once.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import traceback
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from typing import Any, Iterator

import click

from .errors import EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_USER, BatchError, Terminated

log = logging.getLogger(__name__)

ERROR_LINE = re.compile(r"^(?P<file>[^\n]+?):(?P<line>\d+): (?P<field>[^:\n]+): (?P<message>.*)$", re.S)


@dataclass
class Reply:
    """A command's answer: `doc` for --json (ok and exit_code are added), `text` for people."""

    doc: dict[str, Any]
    text: str = ""
    code: int = 0
    notes: list[str] = field(default_factory=list)  # to stderr, after the text


class BatchCli(click.Group):
    """Runs a command and maps its Reply, or any error, to output and an exit code."""

    def main(self, args=None, prog_name=None, **extra):  # noqa: D102 (click's signature)
        args = list(sys.argv[1:] if args is None else args)
        as_json = "--json" in args
        _configure_logging(verbose="-v" in args or "--verbose" in args)
        command = next((a for a in args if not a.startswith("-")), "")
        with _stdout_kept_for_json(as_json):
            try:
                reply = super().main(args, prog_name=prog_name or "omnigen2-batch",
                                     standalone_mode=False, **extra)
            except click.ClickException as err:  # a usage error: a bad option or argument
                reply = _failure(command, EXIT_USER, [err.format_message()])
            except BatchError as err:
                reply = _failure(command, err.exit_code, err.errors, str(err))
            except Terminated as err:
                reply = _failure(command, err.exit_code, [str(err)])
            except (KeyboardInterrupt, click.Abort):
                reply = _failure(command, EXIT_INTERRUPTED,
                                 ["interrupted; committed work is kept: run again to continue"])
            except Exception as err:  # a bug: still a message and an exit code, not a stack
                log.debug("unexpected error", exc_info=True)
                reply = _failure(command, EXIT_INCOMPLETE, [
                    f"unexpected {type(err).__name__}: {err} (a bug in omnigen2-batch; run "
                    "again with --verbose for the traceback, and please report it)"])
                if "-v" in args or "--verbose" in args:
                    traceback.print_exc()
        if not isinstance(reply, Reply):  # --help, --version: click printed it
            sys.exit(reply or 0)
        _print(reply, as_json, command)
        sys.exit(reply.code)


def _failure(command: str, code: int, errors: list[str], text: str | None = None) -> Reply:
    parsed = [_error_record(line) for line in errors]
    return Reply({"command": command, "errors": parsed}, "", code,
                 [f"error: {text if text is not None else chr(10).join(errors)}"])


def _error_record(line: str) -> dict[str, Any]:
    """"file:line: field: message" -> its parts (message alone when it has no such form)."""
    match = ERROR_LINE.match(line)
    if not match:
        return {"file": None, "line": None, "field": None, "message": line}
    return {**match.groupdict(), "line": int(match["line"])}


def _print(reply: Reply, as_json: bool, command: str) -> None:
    if as_json:
        doc = {"ok": reply.code == 0, "command": command, **reply.doc, "exit_code": reply.code}
        click.echo(json.dumps(doc, indent=2, ensure_ascii=False, default=str))
        return
    if reply.text:
        click.echo(reply.text)
    for note in reply.notes:
        click.echo(note, err=True)


@contextmanager
def _stdout_kept_for_json(as_json: bool) -> Iterator[None]:
    """With --json, stdout carries the one JSON document: anything else a library prints
    (Ray, progress, warnings) goes to stderr, at the Python and the file-descriptor level."""
    if not as_json:
        yield
        return
    real = sys.stdout is sys.__stdout__ and _has_fd(sys.stdout)
    saved = None
    if real:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def _has_fd(stream) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True


class _OncePerMessage(logging.Filter):
    """Each warning once; the engine's own loggers from WARNING, libraries' from ERROR (they
    repeat what our messages say, e.g. open_clip on random weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name.startswith("omnigen2_batch")
        if not ours and record.levelno < logging.ERROR:
            return False
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def _configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.addFilter(_OncePerMessage())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "omnigen2_batch", False)]:
        root.removeHandler(old)
    handler.omnigen2_batch = True  # ours to replace on the next in-process call (tests)
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO if verbose else logging.WARNING)
