"""PyTorch -> Flax weight import (and back). The only package of the project that imports torch."""
