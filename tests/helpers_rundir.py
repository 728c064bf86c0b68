"""The report tests' synthetic run dirs. They live in evaluation/synthetic_run.py, because the
report benchmark needs them too and evaluation/ imports only the package, never tests/."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evaluation"))

from synthetic_run import *  # noqa: E402,F401,F403
