"""Shared test set-up: offline Hugging Face hub, Ray on loopback, the parity fixture folder."""
import os
import sys
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
pytest_plugins = ["ray_cluster"]  # slot_cluster, for every module that runs on Ray


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """The golden outputs of the official code; OMNIGEN2_PARITY_DIR swaps in another case set."""
    return Path(os.environ.get("OMNIGEN2_PARITY_DIR", FIXTURES / "parity"))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Every test (and the fixtures it sets up) starts from the same global torch RNG state, so
    a test that seeds torch globally cannot change what a later one sees. pytest-randomly does
    the same for `random` and numpy, with its own seed; torch follows that seed when it is on."""
    torch = sys.modules.get("torch")  # a test that never imported torch pays nothing
    if torch is not None:
        seed = getattr(item.config.option, "randomly_seed", 0)
        torch.manual_seed(seed if isinstance(seed, int) else 0)


@pytest.fixture(autouse=True)
def no_ray_connection_left_behind():
    """run_ray keeps a Ray connection it finds, so one left open would send a later test's run
    to the wrong cluster: close it, and fail the test that left it."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail("the test left this process connected to Ray")
