"""Experiments run by ``xprune run --config=configs/EXP.py``: name -> function(config, run_dir) ->
(results dict, Markdown report)."""

from typing import Callable

from xprune_jax.errors import UserError

EXPERIMENTS: dict[str, Callable] = {}


def register(name: str):
    def decorator(fn):
        EXPERIMENTS[name] = fn
        return fn

    return decorator


def get_experiment(name: str) -> Callable:
    # Experiments import their (possibly heavy) dependencies on registration.
    from xprune_jax.experiments import parity, prune  # noqa: F401

    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r} in the config; choose one of: {', '.join(sorted(EXPERIMENTS))}")
    return EXPERIMENTS[name]
