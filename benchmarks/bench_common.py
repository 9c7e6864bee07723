"""The command-line preamble the benchmark scripts share. No jax here: ``pin_cpus`` must run
before jax starts, since XLA sizes its thread pool from the CPU affinity."""

import argparse
import os

COCO_SUBSET = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "coco_val2017_subset")


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by the script's first paragraph, with ``--threads`` (CPUs to pin
    to; 0: every CPU the process may use, e.g. under ``taskset``), ``--coco`` and ``--seed``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--coco", default=COCO_SUBSET)
    p.add_argument("--seed", type=int, default=0)
    return p


def pin_cpus(threads: int) -> None:
    if threads > 0:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
