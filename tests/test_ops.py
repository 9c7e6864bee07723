"""xprune_jax.ops against torchvision (and Ultralytics for the YOLOv8 helpers) on adversarial inputs."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from torchvision.models.detection._utils import BoxCoder as TorchBoxCoder  # noqa: E402
from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402
from torchvision.models.detection.image_list import ImageList  # noqa: E402
from torchvision.ops import boxes as tv_boxes  # noqa: E402

from xprune_jax import ops  # noqa: E402

NMS_SIZE = 64  # every NMS case is padded to this many boxes, so each threshold compiles once
MAX_OUTPUT = 48


def random_boxes(rng, n, clusters=4, extent=100.0, spread=8.0, size=(4.0, 40.0)):
    """Boxes around a few centres, so that many of them overlap."""
    centres = rng.uniform(0, extent, (clusters, 2))[rng.integers(0, clusters, n)]
    centres += rng.normal(0, spread, (n, 2))
    half = rng.uniform(*size, (n, 2)) / 2
    return np.concatenate([centres - half, centres + half], axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------- NMS


@functools.partial(jax.jit, static_argnames=("iou_threshold", "max_output"))
def jit_nms(boxes, scores, valid, iou_threshold, max_output=MAX_OUTPUT):
    return ops.nms(boxes, scores, valid, iou_threshold, max_output)


@functools.partial(jax.jit, static_argnames=("iou_threshold",))
def jit_batched_nms(boxes, scores, class_ids, valid, iou_threshold):
    return ops.batched_nms(boxes, scores, class_ids, valid, iou_threshold, MAX_OUTPUT)


def pad_with_decoys(boxes, scores, class_ids=None, seed=0):
    """Pad to NMS_SIZE with invalid boxes that would win and suppress everything if they counted.

    The valid boxes are scattered among the decoys; returns the padded arrays and the map from
    padded to original indices.
    """
    n = len(boxes)
    rng = np.random.default_rng(seed)
    slots = np.sort(rng.choice(NMS_SIZE, n, replace=False))
    padded_boxes = np.tile(np.array([[-1000, -1000, 1000, 1000]], np.float32), (NMS_SIZE, 1))
    padded_scores = np.full(NMS_SIZE, 10.0, np.float32)
    valid = np.zeros(NMS_SIZE, bool)
    padded_boxes[slots], padded_scores[slots], valid[slots] = boxes, scores, True
    padded_classes = np.zeros(NMS_SIZE, np.int32)
    if class_ids is not None:
        padded_classes[slots] = class_ids
    return padded_boxes, padded_scores, padded_classes, valid, slots


def kept_original_indices(keep_idx, keep_valid, slots):
    keep_idx, keep_valid = np.asarray(keep_idx), np.asarray(keep_valid)
    assert keep_valid[: keep_valid.sum()].all() and not keep_idx[~keep_valid].any()  # kept first, then 0s
    original = {slot: i for i, slot in enumerate(slots)}
    return [original[i] for i in keep_idx[keep_valid]]


def check_nms(boxes, scores, iou_threshold, seed=0):
    padded_boxes, padded_scores, _, valid, slots = pad_with_decoys(boxes, scores, seed=seed)
    keep_idx, keep_valid = jit_nms(padded_boxes, padded_scores, valid, iou_threshold=iou_threshold)
    expected = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou_threshold)
    # torchvision's CPU kernel sorts stably (ties in index order), as we do: compare the exact order.
    assert kept_original_indices(keep_idx, keep_valid, slots) == expected.tolist()[:MAX_OUTPUT]
    return expected


@pytest.mark.parametrize("seed", range(4))
def test_nms_random_clusters(seed):
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, 50, spread=3, size=(10, 40))
    scores = rng.random(50).astype(np.float32)
    for threshold in (0.5, 0.7):
        expected = check_nms(boxes, scores, threshold, seed)
        assert 3 < len(expected) < 50  # suppression happened and several boxes survived


def test_nms_shapes_only_keeps_a_detectors_abstract_shapes():
    """The layer analysis traces a detector with NMS as shapes only (its tiled algorithm is traced once per
    platform otherwise): every variable and captured output keeps its shape and dtype, and inside the
    context NMS keeps no box."""
    from xprune_jax import models
    from xprune_jax.ops.nms import shapes_only

    arch = "fasterrcnn_mobilenet_v3_large_fpn"  # NMS twice: the RPN's proposals and the detections
    module = models.build(arch, models.get_architecture(arch).default_spec())
    args = (jax.random.key(0), jax.ShapeDtypeStruct((1, 128, 128, 3), jnp.float32))
    real = jax.eval_shape(functools.partial(module.init, mutable=True), *args)
    with shapes_only():
        stubbed = jax.eval_shape(functools.partial(module.init, mutable=True), *args)
    assert jax.tree_util.tree_structure(stubbed) == jax.tree_util.tree_structure(real)
    assert jax.tree_util.tree_leaves(stubbed) == jax.tree_util.tree_leaves(real)  # ShapeDtypeStructs compare
    boxes = jnp.array([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    with shapes_only():
        assert not ops.nms(boxes, jnp.array([0.9, 0.8]), jnp.array([True, True]), 0.5, 2)[1].any()
    assert ops.nms(boxes, jnp.array([0.9, 0.8]), jnp.array([True, True]), 0.5, 2)[1].all()


def test_nms_ties_duplicates_and_degenerate_boxes():
    rng = np.random.default_rng(10)
    boxes = random_boxes(rng, 30)
    boxes[10:14] = boxes[3]  # identical duplicates of box 3 ...
    boxes[20] = [5, 5, 5, 9]  # zero width: NaN IoU with its twin, so neither suppresses the other
    boxes[21] = [5, 5, 5, 9]
    boxes[22] = [7, 7, 7, 7]  # a point
    boxes[23] = [-30, -40, -5, -2]  # entirely at negative coordinates
    boxes[24] = [-35, -38, -6, -1]
    boxes[25] = [90, 90, 400, 300]  # far outside a 100 x 100 image
    scores = rng.choice(np.float32([0.25, 0.5, 0.75]), 30)  # many exact score ties
    scores[10:14] = scores[3]  # ... with the same score too
    scores[20:22] = 0.9
    expected = check_nms(boxes, scores, 0.5)
    assert {20, 21, 22} <= set(expected.tolist()) and len(set(expected.tolist()) & {3, 10, 11, 12, 13}) == 1


def test_nms_iou_exactly_at_threshold():
    # Pairs with IoU 50/100 = 0.5 exactly (not "> 0.5": kept), 3/5 (float32(0.6) > 0.6 in float64,
    # so torchvision suppresses at 0.6, as must we) and 7/10 (float32(0.7) < 0.7: kept at 0.7).
    boxes = np.float32([[0, 0, 10, 10], [0, 0, 10, 5], [0, 20, 5, 21], [0, 20, 3, 21], [0, 30, 10, 31], [0, 30, 7, 31]])
    scores = np.float32([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    for threshold, expected in ((0.5, [0, 1, 2, 4]), (0.6, [0, 1, 2, 4]), (0.7, [0, 1, 2, 3, 4, 5])):
        assert check_nms(boxes, scores, threshold).tolist() == expected


def test_nms_all_invalid_and_max_output():
    rng = np.random.default_rng(3)
    boxes = random_boxes(rng, NMS_SIZE, clusters=60, extent=1000)
    scores = rng.random(NMS_SIZE).astype(np.float32)
    _, keep_valid = jit_nms(boxes, scores, np.zeros(NMS_SIZE, bool), iou_threshold=0.5)
    assert not np.asarray(keep_valid).any()
    # Far more survivors than MAX_OUTPUT: the output is torchvision's first MAX_OUTPUT.
    keep_idx, keep_valid = jit_nms(boxes, scores, np.ones(NMS_SIZE, bool), iou_threshold=0.5)
    expected = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5)
    assert len(expected) > MAX_OUTPUT and np.asarray(keep_valid).all()
    np.testing.assert_array_equal(keep_idx, expected[:MAX_OUTPUT].numpy())


@pytest.mark.parametrize("seed", range(3))
def test_batched_nms_several_classes(seed):
    rng = np.random.default_rng(100 + seed)
    boxes = random_boxes(rng, 50, clusters=3)
    scores = rng.random(50).astype(np.float32)
    classes = rng.integers(0, 4, 50).astype(np.int32)
    padded_boxes, padded_scores, padded_classes, valid, slots = pad_with_decoys(boxes, scores, classes, seed)
    keep_idx, keep_valid = jit_batched_nms(padded_boxes, padded_scores, padded_classes, valid, iou_threshold=0.5)
    args = (torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(classes), 0.5)
    trick = tv_boxes._batched_nms_coordinate_trick(*args)  # torchvision's path up to 1000 boxes on CPU
    vanilla = tv_boxes._batched_nms_vanilla(*args)  # and above
    assert trick.tolist() == vanilla.tolist() == torchvision.ops.batched_nms(*args).tolist()
    assert kept_original_indices(keep_idx, keep_valid, slots) == trick.tolist()[:MAX_OUTPUT]
    assert len(trick) > len(torchvision.ops.nms(*args[:2], 0.5))  # classes did protect boxes


def test_nms_vmap_over_images():
    rng = np.random.default_rng(7)
    boxes = np.stack([random_boxes(rng, NMS_SIZE) for _ in range(2)])
    scores = rng.random((2, NMS_SIZE)).astype(np.float32)
    valid = np.stack([np.arange(NMS_SIZE) < 50, np.arange(NMS_SIZE) >= 20])
    batched = jax.jit(jax.vmap(lambda b, s, v: ops.nms(b, s, v, 0.5, MAX_OUTPUT)))
    keep_idx, keep_valid = batched(boxes, scores, valid)
    for image in range(2):
        (index,) = np.nonzero(valid[image])
        expected = torchvision.ops.nms(torch.from_numpy(boxes[image, index]), torch.from_numpy(scores[image, index]), 0.5)
        np.testing.assert_array_equal(np.asarray(keep_idx[image])[np.asarray(keep_valid[image])], index[expected])


def adversarial_nms_cases(rng) -> dict:
    """name -> (boxes, scores, class ids): the cases where a blockwise NMS could go wrong."""
    cases = {"empty": (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))}
    # All overlapping: identical boxes with identical scores (index order decides), then nested boxes.
    cases["identical"] = (np.tile(np.float32([[10, 10, 50, 40]]), (40, 1)), np.full(40, 0.5, np.float32),
                          np.zeros(40, np.int32))
    shrink = np.arange(30, dtype=np.float32)[:, None] * np.float32([0.2, 0.2, -0.2, -0.2])
    cases["nested"] = (np.float32([[0, 0, 60, 60]]) + shrink, rng.choice(np.float32([0.3, 0.6]), 30),
                       np.zeros(30, np.int32))
    # A chain: each box suppresses the next (IoU 2/3) but not the one after (3/7), so every other box is
    # kept, decided one after another across every tile.
    x = 2 * np.arange(56, dtype=np.float32)[:, None]
    cases["chain"] = (np.concatenate([x, 0 * x, x + 10, 0 * x + 10], 1), np.linspace(1, 0.1, 56, dtype=np.float32),
                      np.zeros(56, np.int32))
    # More survivors than the cap (disjoint boxes), scores tied in threes.
    corners = np.stack(np.meshgrid(np.arange(8), np.arange(8)), -1).reshape(-1, 2)[:60].astype(np.float32) * 20
    cases["over the cap"] = (np.concatenate([corners, corners + 10], 1), np.repeat(rng.random(20), 3).astype(np.float32),
                             np.zeros(60, np.int32))
    boxes = random_boxes(rng, 50, clusters=3)
    boxes[10:14], boxes[20:22], boxes[22] = boxes[3], [5, 5, 5, 9], [7, 7, 7, 7]  # duplicates, zero area, a point
    cases["ties, classes"] = (boxes, rng.choice(np.float32([0.25, 0.5, 0.75]), 50), rng.integers(0, 3, 50).astype(np.int32))
    return cases


@pytest.mark.parametrize("method, tile", [("tiled", 16), ("tiled", None), ("loop", None)],
                         ids=["tiled_16", "tiled_platform", "loop"])
def test_nms_methods_match_torchvision_on_adversarial_cases(method, tile):
    """Every NMS algorithm against torchvision's batched_nms, all cases in one vmapped call. A tile of 16
    splits the 64 padded boxes into four tiles (the platform's tile holds them all). torchvision takes
    its coordinate-offset path at these sizes; its per-class path agrees on the boxes kept, but its last
    sort is not stable, so it may reverse tied scores."""
    cases = adversarial_nms_cases(np.random.default_rng(21))
    padded = [pad_with_decoys(*case, seed=i) for i, case in enumerate(cases.values())]
    boxes, scores, classes, valid = (np.stack([p[k] for p in padded]) for k in range(4))
    nms = functools.partial(ops.batched_nms, iou_threshold=0.5, max_output=MAX_OUTPUT, method=method, tile=tile)
    keep_idx, keep_valid = jax.jit(jax.vmap(nms))(boxes, scores, classes, valid)
    for i, (name, (b, s, c)) in enumerate(cases.items()):
        expected = torchvision.ops.batched_nms(torch.from_numpy(b), torch.from_numpy(s), torch.from_numpy(c), 0.5)
        got = kept_original_indices(keep_idx[i], keep_valid[i], padded[i][4])
        assert got == expected.tolist()[:MAX_OUTPUT], name
    assert [len(torchvision.ops.batched_nms(*(torch.from_numpy(a) for a in case), 0.5)) for case in
            list(cases.values())[:5]] == [0, 1, 1, 28, 60]  # the cases are the ones intended


def test_top_k_pairs_is_lax_top_k_ties_included():
    rng = np.random.default_rng(4)
    # Many ties, and rows of -inf: tied pairs in rows of different maxima come out in flat-index order.
    scores = rng.choice(np.float32([0.1, 0.5, 0.9, -np.inf]), (2, 40, 7), p=[0.5, 0.4, 0.02, 0.08])
    scores[1, 30] = 0.95  # one row holding the best pair
    flat = scores.reshape(2, -1)
    for k in (1, 25, 45):  # fewer, and more, than the 40 rows
        values, index = ops.top_k_pairs(scores, k)
        expected_values, expected_index = jax.lax.top_k(flat, k)
        np.testing.assert_array_equal(values, expected_values)
        np.testing.assert_array_equal(index, expected_index)



def test_top_k_above_keeps_lax_top_k_set_in_index_order():
    rng = np.random.default_rng(5)
    # Ties at every value, negatives, zeros and -inf: the k-th value is tied, so the boundary rule shows.
    scores = rng.choice(np.float32([-2.0, -0.0, 0.0, 1e-4, 0.3, 0.7, 0.7000001, -np.inf]), 500)
    # The k-th value at zero: lax.top_k orders -0.0 below 0.0 (a total order), and so must this.
    signed_zeros = np.float32([-0.0, 0.0, -0.0, 0.0, 1.0, -0.0])
    for scores, threshold, k in [(scores, t, k) for t, k in ((-1.0, 100), (0.2, 30), (0.2, 137), (0.2, 400),
                                                             (-np.inf, 500), (0.9, 10))] + [(signed_zeros, -1.0, 3)]:
        expected_values, expected_index = jax.lax.top_k(np.where(scores > threshold, scores, -np.inf), k)
        kept = np.asarray(expected_values) > threshold
        values, index, valid = jax.jit(ops.top_k_above, static_argnums=(1, 2))(scores, threshold, k)
        order = np.argsort(np.asarray(expected_index)[kept])
        np.testing.assert_array_equal(np.asarray(index)[valid], np.asarray(expected_index)[kept][order])
        np.testing.assert_array_equal(np.asarray(values)[valid], np.asarray(expected_values)[kept][order])
        assert np.all(np.asarray(values)[~np.asarray(valid)] == -np.inf), (threshold, k)
        assert int(np.sum(valid)) == min(k, int(np.sum(scores > threshold))), (threshold, k)

# ----------------------------------------------------------------------------------------- RoIAlign


@functools.partial(jax.jit, static_argnames=("aligned",))
def jit_roi_align(features, boxes, batch_idx, aligned):
    return ops.roi_align(features, boxes, batch_idx, (3, 4), 0.5, 2, aligned)


def adversarial_rois(rng):
    """Boxes in image coordinates for a 2 x 20 x 24 image batch (feature maps 10 x 12 at scale 0.5)."""
    special = np.float32(
        [
            [0, 0, 24, 20],  # the whole image
            [-6, -4, 10, 8],  # partly outside, top-left
            [14, 12, 40, 36],  # partly outside, bottom-right
            [-30, -30, -5, -5],  # fully outside: samples below -1
            [50, 44, 70, 60],  # fully outside: samples beyond H, W
            [-2.5, 5, -0.5, 9],  # outside, but some samples lie in the [-1, 0) grace band
            [5.2, 6.1, 5.6, 6.3],  # tiny (< 1 px)
            [7.3, 3.3, 7.3, 3.3],  # a point
            [11, 9, 12, 10],  # tiny, near a corner
            [23.5, 19.5, 24, 20],  # at the high edge (clamped to H - 1, W - 1)
            [10, 8, 4, 2],  # inverted
        ]
    )
    x1y1 = rng.uniform(-8, 26, (13, 2))
    random = np.concatenate([x1y1, x1y1 + rng.uniform(0.1, 20, (13, 2))], axis=1).astype(np.float32)
    return np.concatenate([special, random])


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align(aligned):
    rng = np.random.default_rng(5)
    features = rng.normal(size=(2, 10, 12, 3)).astype(np.float32)
    boxes = adversarial_rois(rng)
    batch_idx = rng.integers(0, 2, len(boxes)).astype(np.int32)
    result = jit_roi_align(features, boxes, batch_idx, aligned=aligned)
    rois = torch.from_numpy(np.concatenate([batch_idx[:, None].astype(np.float32), boxes], axis=1))
    expected = torchvision.ops.roi_align(
        torch.from_numpy(features).permute(0, 3, 1, 2), rois, (3, 4), 0.5, 2, aligned
    ).permute(0, 2, 3, 1)
    assert not expected[3].any() and expected[5].any()  # the cases are the ones intended
    np.testing.assert_allclose(result, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_roi_align_rejects_adaptive_sampling():
    with pytest.raises(ValueError, match="sampling_ratio"):
        ops.roi_align(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 4)), jnp.zeros(1, jnp.int32), 2, 1.0, -1, False)


def test_multiscale_roi_align():
    rng = np.random.default_rng(11)
    image_size = (256, 384)  # the padded batch; torchvision gets the unpadded sizes
    image_sizes = [(241, 377), (230, 350)]
    features = [rng.normal(size=(2, 256 // s, 384 // s, 4)).astype(np.float32) for s in (4, 8, 16, 32)]
    sizes = np.exp(rng.uniform(np.log(8), np.log(900), (2, 24, 2)))  # sqrt(area) from 8 to 900 px
    x1y1 = rng.uniform(-20, 300, (2, 24, 2))
    boxes = np.concatenate([x1y1, x1y1 + sizes], axis=-1).astype(np.float32)
    boxes[0, 0] = [10, 10, 122, 122]  # sqrt(area) 112: exactly on the level 2/3 boundary
    boxes[0, 1] = [0, 0, 111.999954, 112]  # log2 rounds just below the boundary: eps lifts it to 3

    cotangent = rng.normal(size=(2, 24, 7, 7, 4)).astype(np.float32)

    @jax.jit
    def pool_and_pull_back(features, cotangent):
        result, pullback = jax.vjp(lambda f: ops.multiscale_roi_align(f, boxes, image_size), features)
        return result, pullback(cotangent)[0]

    result, feature_grads = pool_and_pull_back(features, cotangent)

    pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    named = {str(i): torch.from_numpy(f).permute(0, 3, 1, 2).requires_grad_() for i, f in enumerate(features)}
    expected = pooler(named, list(torch.from_numpy(boxes)), image_sizes)
    levels = pooler.map_levels(list(torch.from_numpy(boxes)))
    assert set(levels.tolist()) == {0, 1, 2, 3} and levels[0] == levels[1] == 1
    expected = expected.permute(0, 2, 3, 1)
    np.testing.assert_allclose(result.reshape(-1, 7, 7, 4), expected.detach().numpy(), rtol=1e-5, atol=1e-5)
    # The gradient with respect to every level (what attribution differentiates through).
    expected.backward(torch.from_numpy(cotangent.reshape(-1, 7, 7, 4)))
    for grad, level in zip(feature_grads, named.values()):
        np.testing.assert_allclose(grad, level.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------- boxes


def test_box_iou_area_clip_and_small_boxes():
    rng = np.random.default_rng(2)
    boxes = random_boxes(rng, 12, extent=60, size=(0.5, 50))
    boxes[0] = [3, 3, 3, 8]  # zero area: NaN IoU with itself
    boxes[1] = [-10, -5, 70, 90]
    boxes[2] = [20, 20, 28, 29]  # exactly min_size wide: kept
    t = torch.from_numpy(boxes)
    np.testing.assert_allclose(ops.box_iou(boxes, boxes[:7]), tv_boxes.box_iou(t, t[:7]).numpy(), rtol=1e-6, atol=1e-7)
    assert np.isnan(ops.box_iou(boxes[:1], boxes[:1])[0, 0])
    np.testing.assert_allclose(ops.box_area(boxes), tv_boxes.box_area(t).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(ops.clip_boxes_to_image(boxes, 50, 40), tv_boxes.clip_boxes_to_image(t, (50, 40)).numpy())
    for min_size in (1.0, 8.0):
        keep = np.asarray(ops.small_box_mask(boxes, min_size))
        np.testing.assert_array_equal(np.nonzero(keep)[0], tv_boxes.remove_small_boxes(t, min_size).numpy())


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder(weights):
    rng = np.random.default_rng(4)
    proposals = random_boxes(rng, 40, size=(1, 60))
    references = random_boxes(rng, 40, size=(1, 60))
    coder, torch_coder = ops.BoxCoder(weights), TorchBoxCoder(weights)
    np.testing.assert_allclose(
        coder.encode(references, proposals),
        torch_coder.encode_single(torch.from_numpy(references), torch.from_numpy(proposals)).numpy(),
        rtol=1e-5,
        atol=1e-5,
    )
    # Three classes per box; dw, dh from -8 to 8 times the weight: the clamp at log(1000/16) is hit.
    codes = rng.normal(0, 2, (40, 3, 4)).astype(np.float32)
    codes[..., 2:] = rng.uniform(-8, 8, (40, 3, 2)) * np.float32(weights[2:])
    codes[0, 0] = [0, 0, 1e4, -1e4]
    decoded = coder.decode(codes, proposals[:, None])
    expected = torch_coder.decode_single(torch.from_numpy(codes.reshape(40, 12)), torch.from_numpy(proposals))
    assert (codes[..., 2:] / np.float32(weights[2:]) > math.log(1000 / 16)).sum() > 5
    np.testing.assert_allclose(decoded, expected.reshape(40, 3, 4).numpy(), rtol=1e-5, atol=1e-4)


def torch_anchors(sizes, aspect_ratios, image_size, feature_sizes):
    generator = AnchorGenerator(sizes, aspect_ratios)
    images = ImageList(torch.zeros(1, 3, *image_size), [image_size])
    return generator(images, [torch.zeros(1, 1, h, w) for h, w in feature_sizes])[0].numpy()


@pytest.mark.parametrize("detector", ["fasterrcnn", "retinanet"])
def test_grid_anchors(detector):
    if detector == "fasterrcnn":
        sizes, ratios = ((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5
    else:
        sizes = tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in [32, 64, 128, 256, 512])
        ratios = ((0.5, 1.0, 2.0),) * 5
    image_size, feature_sizes = (96, 128), [(24, 32), (12, 16), (6, 8), (3, 4), (2, 2)]
    anchors = ops.grid_anchors(sizes, ratios, feature_sizes, image_size)
    np.testing.assert_array_equal(anchors, torch_anchors(sizes, ratios, image_size, feature_sizes))
    # The coarsest levels of an 800 x 1216 batch, whose strides are floored (800 // 13 = 61, 1216 // 10 = 121).
    feature_sizes = [(13, 19), (7, 10)]
    anchors = ops.grid_anchors(sizes[3:], ratios[3:], feature_sizes, (800, 1216))
    np.testing.assert_array_equal(anchors, torch_anchors(sizes[3:], ratios[3:], (800, 1216), feature_sizes))


def test_yolo_anchor_points_and_dist2bbox():
    tal = pytest.importorskip("ultralytics.utils.tal")
    feature_sizes, strides = [(8, 10), (4, 5), (2, 3)], [8, 16, 32]
    points, point_strides = ops.make_anchor_points(feature_sizes, strides)
    expected_points, expected_strides = tal.make_anchors([torch.zeros(1, 1, h, w) for h, w in feature_sizes], strides)
    np.testing.assert_array_equal(points, expected_points.numpy())
    np.testing.assert_array_equal(point_strides, expected_strides.numpy())

    distance = np.random.default_rng(6).uniform(0, 6, (2, len(points), 4)).astype(np.float32)
    for xywh in (True, False):
        expected = tal.dist2bbox(torch.from_numpy(distance), torch.from_numpy(points), xywh=xywh)
        np.testing.assert_allclose(ops.dist2bbox(distance, points, xywh=xywh), expected.numpy(), rtol=1e-6)
