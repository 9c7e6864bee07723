"""Experiments run by ``xprune run --config=configs/EXP.py`` (:mod:`.registry` holds them by name), and a
check of the config that runs before any work."""

from typing import Callable

from xprune_jax.errors import UserError
from xprune_jax.experiments.registry import EXPERIMENTS, VALIDATORS


def get_experiment(name: str) -> Callable:
    # Experiments import their (possibly heavy) dependencies on registration.
    from xprune_jax.experiments import parity, prune  # noqa: F401

    if not isinstance(name, str) or name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r} in the config; choose one of: {', '.join(sorted(EXPERIMENTS))}")
    return EXPERIMENTS[name]


def validated_experiment(config) -> Callable:
    """The config's experiment, once its config passed the experiment's checks."""
    experiment = get_experiment(config.get("experiment"))
    if config.experiment in VALIDATORS:
        VALIDATORS[config.experiment](config)
    return experiment
