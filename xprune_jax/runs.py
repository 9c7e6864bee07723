"""Run folders: every figure is reproducible from the command, config, seed and environment
recorded beside it."""

import datetime
import os
import platform
import sys

import jax

from xprune_jax import __version__
from xprune_jax.checkpoint import write_json_atomic
from xprune_jax.fileio import atomic_path

DEMO_COCO = os.path.join(os.path.dirname(__file__), "data", "demo_coco")


def environment() -> dict:
    import flax

    return {
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "xprune_jax": __version__, "python": platform.python_version(), "jax": jax.__version__,
        "flax": flax.__version__, "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()], "machine": platform.machine(),
        "processor": platform.processor(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
    }


def start_run(config) -> str:
    """Create the run folder and record the config and environment in it."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = os.path.abspath(config.get("out_dir") or os.path.join("runs", f"{config.experiment}-{stamp}"))
    os.makedirs(os.path.join(run_dir, "plots"), exist_ok=True)
    write_json_atomic(os.path.join(run_dir, "config.json"), config.to_dict())
    write_json_atomic(os.path.join(run_dir, "environment.json"), environment())
    return run_dir


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported only by runs that plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    """Write a PNG atomically (a crash leaves the old plot or none, never half of one) and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    pyplot().close(fig)


def finish_run(run_dir: str, results: dict, report_markdown: str) -> None:
    write_json_atomic(os.path.join(run_dir, "results.json"), results)
    with atomic_path(os.path.join(run_dir, "report.md")) as tmp, open(tmp, "w") as f:
        f.write(report_markdown)
