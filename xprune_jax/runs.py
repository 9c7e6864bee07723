"""Run folders: every figure is reproducible from the command, config, seed and environment
recorded beside it."""

import contextlib
import dataclasses
import datetime
import importlib.util
import os
import platform
import shutil
import sys
import tempfile

import jax

from xprune_jax import __version__, precision
from xprune_jax.checkpoint import write_json_atomic
from xprune_jax.fileio import atomic_path

DEMO_COCO = os.path.join(os.path.dirname(__file__), "data", "demo_coco")


def config_module(path: str):
    """The experiment config file at ``path`` as a module (its ``get_config`` and constants), so that one
    config can build on another, and a benchmark can reuse a config's recipe."""
    name = "xprune_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu() -> dict:
    """The CPU's model name and the vector extensions XLA's kernels depend on (Linux; empty elsewhere):
    two machines of one name can differ by AVX-512, and CPU timings with them."""
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return {}
    info = {k.strip(): v.strip() for k, v in info.items()}
    flags = set(info.get("flags", "").split())
    return {"cpu_model": info.get("model name", ""),
            "cpu_vector_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))}


def environment() -> dict:
    import flax

    return {
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "xprune_jax": __version__, "python": platform.python_version(), "jax": jax.__version__,
        "flax": flax.__version__, "backend": jax.default_backend(), "precision": precision.current(),
        "devices": [str(d) for d in jax.devices()], "machine": platform.machine(),
        "processor": platform.processor(), "cpu_count": os.cpu_count(),
        # the CPUs this process may run on: XLA's CPU threads, and with them its summation order, follow them
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        **cpu(), "platform": platform.platform(),
    }


@dataclasses.dataclass(frozen=True)
class RunFolder:
    """A run's folder (``path``) and where the run writes what it makes (``out``): the folder itself, or,
    where it holds a finished run's results, a staging folder ``path/.next-*`` of this run's own, which
    :func:`finish_run` moves into place together with the new results. A run that stops with an error
    leaves a finished run's folder as it was: its results, report, config, environment and artefacts
    still belong together."""
    path: str
    out: str

    @property
    def staged(self) -> bool:
        return self.out != self.path


NEXT = ".next-"  # the prefix of a staging folder


@contextlib.contextmanager
def open_run(config):
    """Create the run folder and yield its :class:`RunFolder`; record the config and environment in it if
    it is new, or else stage the run's artefacts. What a run that stops staged is removed."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = os.path.abspath(config.get("out_dir") or os.path.join("runs", f"{config.experiment}-{stamp}"))
    os.makedirs(run_dir, exist_ok=True)
    if not os.path.exists(os.path.join(run_dir, "results.json")):
        _record(run_dir, config)
        yield RunFolder(run_dir, run_dir)
        return
    folder = RunFolder(run_dir, tempfile.mkdtemp(dir=run_dir, prefix=NEXT))  # its own: runs may share a folder
    try:
        yield folder
    finally:
        shutil.rmtree(folder.out, ignore_errors=True)


def _record(run_dir: str, config) -> None:
    write_json_atomic(os.path.join(run_dir, "config.json"), config.to_dict())
    write_json_atomic(os.path.join(run_dir, "environment.json"), environment())


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


def finish_run(folder: RunFolder, config, results: dict, report_markdown: str) -> None:
    """Move a staged run's artefacts into place, then write the results and the report beside the config
    and environment that made them."""
    if folder.staged:
        _move_into(folder.out, folder.path)
    _record(folder.path, config)
    write_json_atomic(os.path.join(folder.path, "results.json"), results)
    with atomic_path(os.path.join(folder.path, "report.md")) as tmp, open(tmp, "w") as f:
        f.write(report_markdown)


def _move_into(source: str, target: str) -> None:
    """Move every file of ``source`` to the same place under ``target``, replacing what is there; a model
    directory (one holding ``model.json``) replaces its namesake whole."""
    for name in os.listdir(source):
        src, dst = os.path.join(source, name), os.path.join(target, name)
        if os.path.isdir(src) and not os.path.isfile(os.path.join(src, "model.json")):
            os.makedirs(dst, exist_ok=True)
            _move_into(src, dst)
            continue
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        os.replace(src, dst)
