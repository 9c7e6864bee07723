"""Shared test set-up: float32 parity settings, the JAX compilation cache, the garbage collector, real
COCO images."""

import gc
import os
import pathlib

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
COCO_SUBSET = pathlib.Path(os.environ.get("XPRUNE_COCO_SUBSET", REPO.parent / "shared" / "coco_val2017_subset"))

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", str(REPO / ".cache" / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# The tests' many `xprune` processes compile the same small programs again and again: they cache every
# program, however quick to compile. This process keeps its programs in memory; caching all of them
# here too made the suite slower (writes), so it stays at 0.5 s.
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
# Tracing makes millions of short-lived objects: at Python's default thresholds the collector ran ~7000 times
# in a minute of planning tests (11% of their time), scanning everything the session keeps. Collect rarely,
# and never scan what the imports made.
gc.freeze()
gc.set_threshold(100_000, 50, 100)


def pytest_configure(config):
    """The tests compile far more than they compute (small shapes): LLVM's optimisation of the CPU code was
    a fifth of the suite's time, so the tests' programs, and their subprocesses' (they inherit the
    environment), are compiled without it; XLA's own passes and library kernels are unchanged. Set here,
    not on import: a script that imports a test module keeps the flags it was started with."""
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()


def optimised(jitted, *args):
    """``jitted(*args)`` compiled at XLA's default optimisation level, for the few tests that compute more
    than they compile: float64 gradients of whole networks, compared with torch autograd."""
    return jitted.lower(*args).compile({"xla_backend_optimization_level": 3})(*args)


@pytest.fixture(scope="session")
def coco_root() -> pathlib.Path:
    if not (COCO_SUBSET / "val2017").is_dir():
        pytest.fail(f"the real COCO subset is missing at {COCO_SUBSET}; set XPRUNE_COCO_SUBSET")
    return COCO_SUBSET


@pytest.fixture(scope="session")
def coco_images(coco_root) -> list[pathlib.Path]:
    return sorted((coco_root / "val2017").glob("*.jpg"))
