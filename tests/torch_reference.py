"""The torch reference helpers live in the product (converters.reference); tests import them here."""

from converters.reference import outputs_by_name, randomize_batch_norm, random_torchvision, relative_error  # noqa: F401
