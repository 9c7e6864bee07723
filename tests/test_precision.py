"""``--precision``: what each setting asks of JAX, what ``cast`` does, and that a bfloat16 network's
post-processing stays in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xprune_jax import models, precision
from xprune_jax.errors import UserError
from xprune_jax.models.yolov8 import Detect


def test_set_precision_current_use_and_cast():
    tree = {"w": np.ones(3, np.float32), "n": np.arange(3), "mask": np.ones(2, bool), "j": jnp.ones(2)}
    with precision.use("bfloat16"):
        assert precision.current() == "bfloat16"
        cast = precision.cast(tree)
        assert cast["w"].dtype == cast["j"].dtype == jnp.bfloat16
        assert cast["n"].dtype == tree["n"].dtype and cast["mask"].dtype == bool
        with precision.use("default"):
            assert precision.current() == "default" and jax.config.jax_default_matmul_precision is None
            assert precision.cast(tree) is tree
        assert precision.current() == "bfloat16"
    assert precision.current() == "highest"  # conftest's setting is back
    with pytest.raises(UserError, match="unknown precision 'fp8': use one of highest, default, bfloat16"):
        precision.set_precision("fp8")


def test_bfloat16_yolov8_head_decodes_boxes_in_float32():
    """In a bfloat16 network, YOLOv8's Detect head still decodes its boxes (DFL, anchors, strides) and
    scores in float32, close to the float32 head's (its own convs on a 64 px image's feature maps)."""
    spec = models.get_architecture("yolov8n").default_spec()
    widths = {c2f.name: c2f.out for c2f in spec.c2fs}  # the head reads model.15, 18 and 21
    features = [np.random.default_rng(i).normal(size=(1, 64 // s, 64 // s, widths[f"model.{k}"])).astype(np.float32)
                for i, (s, k) in enumerate(zip(spec.detect.strides, (15, 18, 21)))]
    head = Detect(spec.detect, spec.bn_eps, spec.fused)
    variables = jax.jit(head.init)(jax.random.key(0), features)
    apply = jax.jit(head.apply)
    full = apply(variables, features)
    with precision.use("bfloat16"):
        half = apply(precision.cast(variables), precision.cast(features))
    assert half.dtype == jnp.float32
    # Box coordinates reach 64 px, where bfloat16 steps by 0.25-0.5 px.
    np.testing.assert_allclose(half[:, :4], full[:, :4], atol=1.0)
    np.testing.assert_allclose(half[:, 4:], full[:, 4:], atol=0.05)


def test_run_precision_flag_overrides_the_config(tmp_path):
    """``--precision`` reaches ``xprune run``'s config: the parity experiment, which compares at full
    float32, refuses bfloat16 with one line."""
    from tests.test_cli import xprune

    result = xprune("run", "--config=configs/parity.py", "--precision=bfloat16", f"--config.out_dir={tmp_path / 'run'}",
                    check=False)
    assert result.returncode == 2 and "run it with precision 'highest'" in result.stderr, result.stderr


def test_an_evaluation_resumes_only_at_the_precision_that_started_it(tmp_path):
    """An evaluation's record names the precision, so its partial detections resume at that precision only."""
    from tests.test_cli_robustness import detector
    from xprune_jax.evaluation.coco import _start_partial, evaluation_record

    model, entries, partial = detector(), [{"id": 1, "file_name": "a.jpg", "height": 64, "width": 64}], \
        str(tmp_path / "detections.partial.jsonl")
    _start_partial(partial, evaluation_record(model, entries, 1, 0), overwrite=False)
    _start_partial(partial, evaluation_record(model, entries, 1, 0), overwrite=False)  # the same evaluation goes on
    refusal = r"made with another precision \(\w+ there, bfloat16 here\); choose another"
    with precision.use("bfloat16"), pytest.raises(UserError, match=refusal):
        _start_partial(partial, evaluation_record(model, entries, 1, 0), overwrite=False)
