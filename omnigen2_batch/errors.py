"""One error hierarchy: every failure a person can act on, and the exit code it ends in.

The CLI maps these to exit codes in one place (cli.py); library code raises the most specific
class and writes a message that says which file or field, what was expected and what to do.
Exit codes (README, "Exit codes"): 0 all kept, 1 finished with rejected or failed jobs,
2 invalid input or directory in use, 3 the environment cannot run it, 130 interrupted,
143 terminated.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_INCOMPLETE = 1  # the run finished, but some job was rejected or failed (or too few kept)
EXIT_USER = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class BatchError(Exception):
    """Base of every error the engine reports to a person (message, no traceback)."""

    exit_code = EXIT_INCOMPLETE

    def __init__(self, message: str, *, errors: list[str] | None = None):
        super().__init__(message)
        self.errors = errors or [message]  # one line each: "file:line: field: message"


class UserError(BatchError):
    """Invalid input: a recipe, an option, an input image, a run directory (exit 2)."""

    exit_code = EXIT_USER


class UnavailableError(BatchError):
    """The environment cannot run this: the model, the scorer's weights, the device or the
    cluster is missing; found before any work starts whenever possible (exit 3)."""

    exit_code = EXIT_UNAVAILABLE


class Terminated(BaseException):
    """SIGTERM: stop at once. Raised from the signal handler into whatever runs, so a batch in
    flight is dropped mid-computation (it is redone on resume; everything committed stays).
    A BaseException, like KeyboardInterrupt, so that code catching a job's ordinary failures
    (`except Exception`) lets it through."""

    exit_code = EXIT_TERMINATED
