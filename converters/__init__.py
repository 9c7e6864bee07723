"""PyTorch -> Flax weight import (and back). The only package of the project that imports torch."""


def load_pruned(path: str):
    """The eval-mode torch module of a file written by ``xprune export --format=torch``: torch and
    torchvision only, no JAX (:mod:`converters.pruned`)."""
    from converters.pruned import load_pruned as load

    return load(path)
