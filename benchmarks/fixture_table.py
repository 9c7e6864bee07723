"""The README's table of the trained fixtures, made from their run folders.

    python benchmarks/fixture_table.py                      # every benchmarks/results/tables/<arch>/
    python benchmarks/fixture_table.py --tables=DIR --archs=yolov8n,mobilenet_v2

Each row is one mode and budget, each column one criterion: the mean metric over calibration
seeds (± standard deviation; no ± where the seeds agreed), the best in bold, "-" where that
criterion's plan could not meet the budget, "not run" where the run had no such criterion. A budget
no criterion could meet has no row. FLOPs and latency are the pruned model's over the unpruned
one's, averaged over the criteria. Every number comes from the runs' ``results.json``.
"""

import argparse
import json
import os

from xprune_jax.experiments.prune import format_metric

HERE = os.path.dirname(os.path.abspath(__file__))
LABELS = {"yolov8n": "YOLOv8n", "mobilenet_v2": "MobileNetV2", "shufflenet_v2_x1_0": "ShuffleNetV2",
          "retinanet_resnet50_fpn": "RetinaNet", "fasterrcnn_resnet50_fpn": "Faster R-CNN", "resnet50": "ResNet-50"}
CRITERIA = ("grad_x_act", "grad_x_act:mean", "grad_x_act:signed", "l1", "random")
MODES = ("zero", "remove", "shrink")


def _budget_label(mode: str, budget: str) -> str:
    kind, value = budget.split("=", 1)
    return f"{mode} {value} of layers" if kind == "layers" else f"{mode} {value}"


def _budget_order(budget: str) -> float:
    return -float(budget.split("=", 1)[1].rstrip("%"))


def table_rows(results: dict, label: str) -> list[str]:
    metric = results["metric"]
    fmt = lambda value: format_metric(metric, value)  # noqa: E731
    run_criteria = {r["criterion"] for r in results["rows"]}
    cells = {(s["mode"], s["budget"], s["criterion"]): s for s in results["summary"]}
    budgets = sorted({(r["mode"], r["budget"]) for r in results["rows"]},
                     key=lambda mb: (MODES.index(mb[0]), _budget_order(mb[1])))
    lines = []
    for mode, budget in budgets:
        group = [cells[mode, budget, c] for c in CRITERIA if (mode, budget, c) in cells]
        if not group:
            continue
        values = []
        for criterion in CRITERIA:
            s = cells.get((mode, budget, criterion))
            if criterion not in run_criteria:
                values.append("not run")
            elif s is None:
                values.append("-")
            else:
                text = fmt(s["metric_mean"]) + (f" ± {fmt(s['metric_std'])}" if fmt(s["metric_std"]) != fmt(0.0) else "")
                values.append(f"**{text}**" if s["best"] else text)
        flops = sum(s["flops_ratio"] for s in group) / len(group)
        latency = sum(s["latency_ratio"] for s in group) / len(group)
        first = f"{label}, {'top-1' if metric == 'top1' else metric}" if not lines else ""
        lines.append(f"| {first} | {_budget_label(mode, budget)} | {' | '.join(values)} | {flops:.2f} | {latency:.2f} |")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", default=os.path.join(HERE, "results", "tables"), help="folder of run folders, one per arch")
    p.add_argument("--archs", default=",".join(LABELS), help="comma-separated, in table order")
    args = p.parse_args(argv)
    lines = ["| fixture, metric | mode, budget | " + " | ".join(CRITERIA) + " | FLOPs | latency |",
             "|---|---|" + "---|" * len(CRITERIA) + "---|---|"]
    for arch in args.archs.split(","):
        path = os.path.join(args.tables, arch, "results.json")
        if os.path.exists(path):
            with open(path) as f:
                lines += table_rows(json.load(f), LABELS.get(arch, arch))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
