"""Shared test set-up: offline Hugging Face hub, Ray on loopback, the parity fixture folder."""
import os
from pathlib import Path

# Set before anything imports huggingface_hub or ray: an accidental hub call fails fast, and Ray
# never binds a public interface or phones home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The tiny models are far too small to gain from threads; on 2 cores, threads of parallel
# processes (the CLI subprocesses, Ray actors) only wait on each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """The golden outputs of the official code; OMNIGEN2_PARITY_DIR swaps in another case set."""
    return Path(os.environ.get("OMNIGEN2_PARITY_DIR", FIXTURES / "parity"))
