"""``--mode=auto``: the calibration loss each candidate allocation is judged by, and the choice."""

import dataclasses

import numpy as np
import optax
import pytest

from tests.test_cli_robustness import SHAPES, classifier, detector
from xprune_jax import analysis, cli, predict
from xprune_jax.attribution.score import score_model, selection_loss
from xprune_jax.data.images import image_folder
from xprune_jax.errors import UserError
from xprune_jax.pruning.plan import make_plan
from xprune_jax.pruning.select import CANDIDATES, select_plan


def _cross_entropy(logits, labels) -> float:
    return float(np.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)))


def test_selection_loss_is_the_mean_cross_entropy_against_labels_else_the_unpruned_top1():
    paths, labels, _ = image_folder(str(SHAPES / "classification" / "train"), classifier().meta["categories"])
    paths, labels = paths[:3], labels[:3]  # batches of 2: the last one padded
    model, other = classifier(0), classifier(1)
    logits, other_logits = (predict.classify(m, paths, 2, progress=False) for m in (model, other))
    assert selection_loss(model, "cross_entropy", (paths, labels), 2)(model) == pytest.approx(
        _cross_entropy(logits, labels), rel=1e-5)
    # no labels: the unpruned model's top-1 is the target of every candidate, not the candidate's own
    unlabelled = selection_loss(model, "cross_entropy", (paths, None), 2)
    assert unlabelled(other) == pytest.approx(_cross_entropy(other_logits, logits.argmax(-1)), rel=1e-5)
    assert unlabelled(other) != pytest.approx(_cross_entropy(other_logits, other_logits.argmax(-1)), rel=1e-3)
    with pytest.raises(UserError, match="needs their ground truth.*--objective=loss"):
        selection_loss(detector(), "confidence", (paths, None), 2)


def test_auto_takes_the_candidate_of_lowest_loss_and_records_every_one():
    model = classifier(0)
    scores = score_model(model, ["l1"], progress=False)
    params = lambda m: analysis.count_params(m.arch, m.spec)  # noqa: E731  a loss that differs between candidates
    plan = select_plan(model, scores, "flops=-30%", params, CANDIDATES)
    tried = plan.selection["candidates"]
    assert [(t["mode"], t["normalize"]) for t in tried] == [tuple(c.split(":")) for c in CANDIDATES]
    best = min(tried, key=lambda t: t["loss"])
    assert (plan.mode, plan.normalize) == (best["mode"], best["normalize"]) and len({t["loss"] for t in tried}) > 1
    again = make_plan(model, scores, plan.mode, "flops=-30%", normalize=plan.normalize)
    assert dataclasses.replace(plan, selection=None) == again and best["loss"] == again.params_after
    assert best["flops_ratio"] == again.flops_after / again.flops_before
    # the same loss for all: the first candidate; a loss that is never finite: an error, not a choice
    assert (select_plan(model, scores, "flops=-30%", lambda m: 1.0, CANDIDATES[::-1]).mode,) == ("remove+shrink",)
    with pytest.raises(UserError, match="not finite"):
        select_plan(model, scores, "flops=-30%", lambda m: float("nan"), CANDIDATES[:2])
    with pytest.raises(UserError, match="flops=-N% or params=-N% budget"):
        select_plan(model, scores, "layers=5%", params)
    with pytest.raises(UserError, match="bad candidate 'zero:mean'"):
        select_plan(model, scores, "flops=-30%", params, ("zero:mean",))
    # xprune prune's --candidates spells the library's default out (cli imports no pruning code at start)
    assert cli.FLAGS["candidates"].default == list(CANDIDATES)
