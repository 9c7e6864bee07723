"""The experiments' registry: name -> function(config, :class:`runs.RunFolder`) -> (results dict,
Markdown report), and each one's config check. Experiment modules register themselves on import."""

from typing import Callable

EXPERIMENTS: dict[str, Callable] = {}
VALIDATORS: dict[str, Callable] = {}


def register(name: str, validate: Callable | None = None):
    """Register an experiment; ``validate(config)`` raises a :class:`UserError` for a config it can't run."""
    def decorator(fn):
        EXPERIMENTS[name] = fn
        if validate is not None:
            VALIDATORS[name] = validate
        return fn

    return decorator
