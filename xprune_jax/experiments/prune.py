"""The ``prune`` experiment: the whole pipeline for one model. Score every layer with every
criterion (per calibration seed), prune under every mode and budget, then measure what each pruned
network keeps (agreement with the unpruned model's top-1) and what it gains (FLOPs, parameters and
latency measured side by side with the unpruned model), and report it all with plots."""

import functools
import os

import jax
import numpy as np

from xprune_jax import analysis, parallel, predict, runs, timing
from xprune_jax.attribution.score import score_model
from xprune_jax.checkpoint import save_model, write_json_atomic
from xprune_jax.data.images import list_images
from xprune_jax.errors import UserError
from xprune_jax.experiments import register
from xprune_jax.experiments.common import prepare_model
from xprune_jax.pruning.plan import apply_plan, make_plan


@register("prune")
def prune_experiment(config, run_dir: str) -> tuple[dict, str]:
    coco = config.coco or runs.DEMO_COCO
    images = list_images(os.path.join(coco, "val2017"))[: config.eval_images or None]
    model, _ = prepare_model(config.arch, config.weights, images, config.seed, run_dir)
    if "preprocess" not in model.meta or "crop" not in model.meta["preprocess"]:
        raise UserError(f"the prune experiment handles classifiers so far; {model.arch} is not one")
    reference_logits = predict.classify(model, images, config.batch_size, progress=False)
    rows, variants = [], {}
    scores_by_seed = {}
    for seed in config.seeds:
        scores = score_model(model, list(config.criteria), config.objective, coco, config.calib_images,
                             config.batch_size, seed, progress=False, all_channel_scores=True)
        write_json_atomic(os.path.join(run_dir, "scores", f"seed{seed}.json"), scores)
        scores_by_seed[seed] = scores
        for criterion in scores["criteria"]:
            single = {**scores, "criterion": criterion, "layers": [
                {**l, "score": l["scores"][criterion], "channel_scores": l["channel_scores_by"][criterion]}
                for l in scores["layers"]]}
            for pruning in config.prunings:
                mode, budget = pruning.split(":", 1)
                plan = make_plan(model, single, mode, budget)
                pruned = apply_plan(model, plan)
                name = f"{criterion}|{mode}|{budget}|seed{seed}"
                logits = predict.classify(pruned, images, config.batch_size, progress=False)
                variants[name] = pruned
                rows.append({"criterion": criterion, "mode": mode, "budget": budget, "seed": seed,
                             "selected": plan.selected,
                             "top1_agreement": float(np.mean(logits.argmax(-1) == reference_logits.argmax(-1))),
                             "flops_ratio": plan.flops_after / plan.flops_before,
                             "params_ratio": plan.params_after / plan.params_before})
                if config.save_models:
                    save_model(pruned, os.path.join(run_dir, "models", name.replace("|", "_").replace(":", "-").replace("=", "")), overwrite=True)
    latency = _measure_latency(model, variants, config)
    for row in rows:
        name = f"{row['criterion']}|{row['mode']}|{row['budget']}|seed{row['seed']}"
        row["latency_ratio"] = latency[name]["ratio_median"]
        row["latency_ratio_iqr"] = latency[name]["ratio_iqr"]
    first = scores_by_seed[config.seeds[0]]
    _plot_scores(first, os.path.join(run_dir, "plots", "layer_scores.png"))
    _plot_ranks(first, os.path.join(run_dir, "plots", "criteria_ranks.png"))
    _plot_tradeoff(rows, os.path.join(run_dir, "plots", "tradeoff.png"))
    results = {"arch": model.arch, "weights": model.meta.get("provenance", {}).get("weights"),
               "eval_images": len(images), "unpruned_latency_ms": latency["unpruned"]["median_ms"],
               "comparison": first["comparison"], "rows": rows}
    return results, _report(results, config)


def _measure_latency(model, variants, config) -> dict:
    mesh = parallel.data_mesh()
    size = model.meta["preprocess"]["crop"]
    batch = parallel.round_up_batch(config.bench.batch_size, mesh)
    x = jax.device_put(np.random.default_rng(0).standard_normal((batch, size, size, 3), np.float32),
                       parallel.batch_sharding(mesh))
    calls = {}
    for name, m in {"unpruned": model, **variants}.items():
        forward, variables = jax.jit(m.module.apply), jax.device_put(m.variables, parallel.replicated(mesh))
        calls[name] = functools.partial(forward, variables, x)
    times = timing.time_side_by_side(calls, config.bench.repeats, config.bench.warmup, config.seed)
    return timing.summarize(times, "unpruned")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_scores(scores: dict, path: str) -> None:
    plt = _pyplot()
    layers = [l for l in scores["layers"] if l["kind"] != "block"]
    fig, ax = plt.subplots(figsize=(11, 3.6))
    for criterion in scores["criteria"]:
        values = np.array([l["scores"][criterion] for l in layers])
        ranks = values.argsort().argsort() / max(1, len(values) - 1)
        ax.plot(ranks, ".-", ms=3, lw=0.6, label=criterion)
    ax.set(title=f"{scores['arch']}: per-layer score as a rank percentile (0 = least important), depth order",
           xlabel="layer (depth order)", ylabel="rank percentile")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_ranks(scores: dict, path: str) -> None:
    plt = _pyplot()
    criteria = scores["criteria"]
    other = next((c for c in criteria[1:] if c.startswith("l1")), criteria[-1])
    layers = [l for l in scores["layers"] if l["kind"] != "block"]
    a = np.array([l["scores"][criteria[0]] for l in layers]).argsort().argsort()
    b = np.array([l["scores"][other] for l in layers]).argsort().argsort()
    row = next(r for r in scores["comparison"] if {r["a"], r["b"]} == {criteria[0], other}) if other != criteria[0] else None
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.scatter(a, b, s=8)
    title = f"{criteria[0]} vs {other}"
    if row:
        title += f"\nSpearman {row['spearman']:+.2f}, Kendall {row['kendall']:+.2f}"
    ax.set(title=title, xlabel=f"rank by {criteria[0]}", ylabel=f"rank by {other}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_tradeoff(rows: list[dict], path: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    markers = {"zero": "x", "remove": "o", "shrink": "s"}
    criteria = sorted({r["criterion"] for r in rows})
    colors = dict(zip(criteria, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    for ax, key, label in ((axes[0], "latency_ratio", "measured latency / unpruned"), (axes[1], "flops_ratio", "FLOPs / unpruned")):
        for r in rows:
            ax.scatter(r[key], r["top1_agreement"], marker=markers[r["mode"]], color=colors[r["criterion"]], s=30)
        ax.set(xlabel=label)
        ax.axvline(1.0, color="grey", lw=0.6)
    axes[0].set_ylabel("top-1 agreement with the unpruned model")
    handles = [plt.Line2D([], [], marker=m, ls="", color="k", label=mode) for mode, m in markers.items()]
    handles += [plt.Line2D([], [], marker="o", ls="", color=colors[c], label=c) for c in criteria]
    axes[1].legend(handles=handles, fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _report(results: dict, config) -> str:
    lines = [f"# Pruning {results['arch']}: criteria x modes x budgets", "",
             f"Weights: {results['weights']}. Metric: top-1 agreement with the unpruned model on {results['eval_images']} "
             "images (fidelity; no labels are used). Latency: measured side by side with the unpruned model "
             f"(batch {config.bench.batch_size}, {config.bench.repeats} rounds in random order after "
             f"{config.bench.warmup} warm-up calls; median ratio [IQR]); unpruned median "
             f"{results['unpruned_latency_ms']:.2f} ms. Config, environment and seeds: `config.json`, `environment.json`; "
             "scores: `scores/`.", "",
             "| criterion | mode | budget | seed | units | top-1 agreement | FLOPs | params | latency |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['criterion']} | {r['mode']} | {r['budget']} | {r['seed']} | {len(r['selected'])} | "
                     f"{r['top1_agreement']:.1%} | {r['flops_ratio']:.3f} | {r['params_ratio']:.3f} | "
                     f"{r['latency_ratio']:.3f} [{r['latency_ratio_iqr'][0]:.3f}, {r['latency_ratio_iqr'][1]:.3f}] |")
    lines += ["", "Criteria agreement (first seed):", "", "| a | b | Spearman | Kendall | bottom-k overlap |", "|---|---|---|---|---|"]
    for c in results["comparison"]:
        lines.append(f"| {c['a']} | {c['b']} | {c['spearman']:+.2f} | {c['kendall']:+.2f} | {c['bottom_k_overlap']:.0%} of {c['bottom_k']} |")
    lines += ["", "`zero` keeps the graph, so its latency ratio measures timing noise, not a speed-up.", "",
              "![layer scores](plots/layer_scores.png)", "", "![criteria ranks](plots/criteria_ranks.png)", "",
              "![trade-off](plots/tradeoff.png)", ""]
    return "\n".join(lines)
