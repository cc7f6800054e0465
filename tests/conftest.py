"""Every test runs on 8 simulated CPU devices; set before JAX is imported anywhere."""

import functools
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test session, inherited by the CLI subprocesses and the
# notebook kernels: many tests compile the same small programs (about 20% of the suite's time).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxlm-test-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# jaxlm's cache (token streams of raw-text training, measured MFU peaks) lives in a per-session
# temporary directory, shared by the xdist workers and CLI subprocesses, never in the user's ~/.cache.
if "JAXLM_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAXLM_CACHE"] = tempfile.mkdtemp(prefix="jaxlm-test-cache-")
    atexit.register(shutil.rmtree, os.environ["JAXLM_CACHE"], True)

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    path = SHARED_DATA / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path}")
    return path


def run_cli(*args: str, env_extra: dict | None = None, timeout: int = 300):
    """Runs `python -m jaxlm.cli ARGS` in a subprocess; returns CompletedProcess."""
    import subprocess

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "jaxlm.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


@functools.cache
def llama_cpp():
    """llama-cpp-python (the export extra compiles it from its sdist); skip, saying why, without it."""
    try:
        import llama_cpp  # loads its native library

        return llama_cpp
    except ImportError as e:
        pytest.skip(f"llama-cpp-python is not installed (the export extra): {e}")
    except (OSError, RuntimeError) as e:  # e.g. a library built against a newer glibc than this machine's
        pytest.skip(f"llama.cpp's library does not load here: {str(e).splitlines()[0][:200]}")


# The longest modules first (the README's commands, the notebooks): xdist hands out modules in this
# order, so a long one that starts last leaves the other workers idle while it finishes.
LONGEST_FIRST = ("tests/test_readme.py::test_readme_commands", "notebooks/")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(LONGEST_FIRST))  # stable: the rest keep their order
