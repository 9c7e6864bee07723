"""The README's tables of pruning runs, made from their run folders: the trained fixtures' table,
the demo's table with the notes under it, and the recovery table.

    python benchmarks/fixture_table.py                      # every benchmarks/results/tables/<arch>/
    python benchmarks/fixture_table.py --tables=DIR --archs=yolov8n,mobilenet_v2
    python benchmarks/fixture_table.py --demo               # benchmarks/results/demo/ (or --demo=RUN_DIR)
    python benchmarks/fixture_table.py --recovery           # every benchmarks/results/recovery/<arch>/
                                                            # (and recovery_default/<arch>/: the auto rows)
    python benchmarks/fixture_table.py --demo --readme=README.md   # put it in the README in place

With ``--readme`` the table replaces the README's text between the two comment lines that mark it
(``<!-- fixture_table.py --demo -->`` and ``<!-- end -->``; ``--recovery`` and neither have their own).

Each row is one mode and budget, each column one criterion: the mean metric over calibration
seeds (± standard deviation where the seeds differ as printed), the best in bold (every one that
ties as printed), "-" where that criterion's plan could not meet the budget, "not run" where the
run had no such criterion (the demo's table has only its run's criteria). A budget no criterion
could meet has no row. FLOPs and latency are the pruned model's over the unpruned one's, averaged
over the criteria. Every number comes from the runs' ``results.json`` (and the demo's
``config.json``).

The recovery table has a row per mode and budget of the default criterion (``grad_x_act``): the
mean over seeds as cut, after BN recalibration and after fine-tuning, and the fine-tuned mean as a
share of the unpruned metric (beside which the unpruned model recovered alike is named, where the task
loss trained it too). The tool's default, `auto` (configs/recovery_default.py, its run folders under
``--defaults``), comes first; where its run read another file of the fixture than the recovery run
did, its rows go under their own label, which names the file's sha256. A fixture with default rows and
no recovery run yet shows the default's rows alone.
"""

import argparse
import json
import os
import sys
import textwrap

from xprune_jax.experiments.prune import best_criteria, format_mean, format_metric, unpruned_label
from xprune_jax.fileio import atomic_path

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(HERE, "results", "demo")
RECOVERY = os.path.join(HERE, "results", "recovery")
RECOVERY_DEFAULT = os.path.join(HERE, "results", "recovery_default")
LABELS = {"yolov8n": "YOLOv8n", "mobilenet_v2": "MobileNetV2", "shufflenet_v2_x1_0": "ShuffleNetV2",
          "retinanet_resnet50_fpn": "RetinaNet", "fasterrcnn_resnet50_fpn": "Faster R-CNN", "resnet50": "ResNet-50"}
CRITERIA = ("grad_x_act", "grad_x_act:mean", "grad_x_act:signed", "l1", "random")
MODES = ("zero", "remove", "shrink")
RECOVERY_MODES = ("auto", "shrink", "remove", "remove+shrink")


def _budget_label(mode: str, budget: str) -> str:
    kind, value = budget.split("=", 1)
    return f"{mode} {value} of layers" if kind == "layers" else f"{mode} {value}"


def _budget_order(budget: str) -> float:
    return -float(budget.split("=", 1)[1].rstrip("%"))


def header(criteria: tuple[str, ...], first: str = "fixture, metric") -> list[str]:
    return [f"| {first} | mode, budget | " + " | ".join(criteria) + " | FLOPs | latency |",
            "|---|---|" + "---|" * len(criteria) + "---|---|"]


def table_rows(results: dict, label: str, criteria: tuple[str, ...] = CRITERIA) -> list[str]:
    metric = results["metric"]
    run_criteria = {r["criterion"] for r in results["rows"]}
    cells = {(s["mode"], s["budget"], s["criterion"]): s for s in results["summary"]}
    budgets = sorted({(r["mode"], r["budget"]) for r in results["rows"]},
                     key=lambda mb: (MODES.index(mb[0]), _budget_order(mb[1])))
    lines = []
    for mode, budget in budgets:
        group = [cells[mode, budget, c] for c in criteria if (mode, budget, c) in cells]
        if not group:
            continue
        best = best_criteria(group, metric)
        values = []
        for criterion in criteria:
            s = cells.get((mode, budget, criterion))
            if criterion not in run_criteria:
                values.append("not run")
            elif s is None:
                values.append("-")
            else:
                text = format_mean(metric, s)
                values.append(f"**{text}**" if criterion in best else text)
        flops = sum(s["flops_ratio"] for s in group) / len(group)
        latency = sum(s["latency_ratio"] for s in group) / len(group)
        first = f"{label}, {'top-1' if metric == 'top1' else metric}" if not lines else ""
        lines.append(f"| {first} | {_budget_label(mode, budget)} | {' | '.join(values)} | {flops:.2f} | {latency:.2f} |")
    return lines


def demo_table(run_dir: str = DEMO) -> str:
    """The README's demo table and the notes under it: every number from the demo's run folder."""
    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    metric, criteria = results["metric"], tuple(config["criteria"])
    seeds = config["seeds"]
    zero = [s["latency_ratio"] for s in results["summary"] if s["mode"] == "zero"]
    notes = [f"Unpruned: {metric} {format_metric(metric, results['unpruned']['metrics'][metric])},",
             f"{results['unpruned']['latency_ms']:.1f} ms a call at batch {config['bench']['batch_size']}.",
             f"{'One calibration seed' if len(seeds) == 1 else f'{len(seeds)} calibration seeds'}",
             f"({config['calib_images']} images{'' if len(seeds) == 1 else ' each'}).",
             "FLOPs and latency are the pruned model's over the unpruned one's, averaged over the criteria;",
             "latency is the median per-round ratio, timed side by side end to end."]
    for row in results["comparison"]:
        if (row["a"], row["b"]) == ("grad_x_act", "l1"):
            notes.append(f"The Spearman correlation of `grad_x_act` with `l1` over the {row['layers']} layers is "
                         f"{row['spearman']:+.2f}.")
    if zero:
        notes.append(f"`zero` keeps every FLOP, so its latency ratios ({min(zero):.2f}-{max(zero):.2f}) are timing noise.")
    lines = header(criteria) + table_rows(results, LABELS.get(results["arch"], results["arch"]), criteria)
    return "\n".join(lines) + "\n\n" + textwrap.fill("(" + " ".join(notes) + ")", width=100)


def recovery_rows(results: dict, label: str, criterion: str = "grad_x_act") -> list[str]:
    """One row per mode and budget of ``criterion`` in a recovery run: as cut, recalibrated, fine-tuned;
    ``label`` (the unpruned model's) on the first row."""
    metric, unpruned = results["metric"], results["unpruned"]["metrics"][results["metric"]]
    cells = sorted((s for s in results["summary"] if s["criterion"] == criterion),
                   key=lambda s: (RECOVERY_MODES.index(s["mode"]), _budget_order(s["budget"])))
    lines = []
    for s in cells:
        stages = [format_mean(metric, s)] + [format_mean(metric, s[k]) if k in s else "-" for k in ("recalibrated", "finetuned")]
        share = f"{s['finetuned']['metric_mean'] / unpruned:.1%}" if "finetuned" in s else "-"
        first = unpruned_label(label, metric, results["unpruned"]) if not lines else ""
        lines.append(f"| {first} | {_budget_label(s['mode'], s['budget'])} | {' | '.join(stages)} | {share} |")
    return lines


def _run(folder: str) -> tuple[dict, str] | None:
    """A run folder's results and the sha256 of the fixture file it read (None where there is no run)."""
    if not os.path.exists(os.path.join(folder, "results.json")):
        return None
    with open(os.path.join(folder, "results.json")) as f, open(os.path.join(folder, "measurements.json")) as g:
        return json.load(f), json.load(g)["context"]["weights_sha256"]


def recovery_table(folder: str = RECOVERY, archs: tuple[str, ...] = tuple(LABELS), defaults: str = RECOVERY_DEFAULT) -> str:
    if not os.path.isdir(defaults):
        print(f"error: --defaults={defaults} is not a folder; give the folder of the configs/recovery_default.py runs "
              "(benchmarks/results/recovery_default)", file=sys.stderr)
        raise SystemExit(2)
    runs = {arch: (_run(os.path.join(folder, arch)), _run(os.path.join(defaults, arch))) for arch in archs}
    if not any(recovery for recovery, _ in runs.values()):
        print(f"error: no <arch>/results.json of a recovery run under {folder} for {', '.join(archs)}; "
              "give --recovery the folder that holds the run folders (benchmarks/results/recovery)", file=sys.stderr)
        raise SystemExit(2)
    lines = ["| fixture (unpruned) | mode, budget | as cut | BN recalibrated | fine-tuned | of unpruned |",
             "|---|---|---|---|---|---|"]
    for arch, (recovery, default) in runs.items():
        label = LABELS.get(arch, arch)
        if recovery is None:  # the default's rows alone until the recovery table has this fixture
            lines += recovery_rows(default[0], label) if default else []
        elif default and default[1] == recovery[1]:  # one fixture file: the default's rows first, under one label
            lines += recovery_rows({**recovery[0], "summary": default[0]["summary"] + recovery[0]["summary"]}, label)
        else:
            if default:
                lines += recovery_rows(default[0], f"{label}, fixture {default[1][:8]}")
            lines += recovery_rows(recovery[0], f"{label}, fixture {recovery[1][:8]}" if default else label)
    return "\n".join(lines)


def put_in_readme(path: str, marker: str, text: str) -> None:
    """Replace what lies between the ``marker`` comment line and the next ``<!-- end -->`` in ``path``."""
    with open(path) as f:
        readme = f.read()
    begin, end = f"<!-- {marker} -->\n", "<!-- end -->"
    if readme.count(begin) != 1 or end not in readme[readme.find(begin):]:
        raise SystemExit(f"{path} has no single `{begin.strip()}` ... `{end}` block to put the table in; add one")
    start = readme.index(begin) + len(begin)
    stop = readme.index(end, start)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(readme[:start] + text + "\n" + readme[stop:])
    print(f"wrote the table into {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", default=os.path.join(HERE, "results", "tables"), help="folder of run folders, one per arch")
    p.add_argument("--archs", default=",".join(LABELS), help="comma-separated, in table order")
    p.add_argument("--demo", nargs="?", const=DEMO, default=None, metavar="RUN_DIR",
                   help="the demo's table and notes from its run folder instead")
    p.add_argument("--recovery", nargs="?", const=RECOVERY, default=None, metavar="FOLDER",
                   help="the recovery table from the recovery runs (one folder per arch) instead")
    p.add_argument("--defaults", default=RECOVERY_DEFAULT, metavar="FOLDER",
                   help="with --recovery: the runs of configs/recovery_default.py (one folder per arch), the auto rows")
    p.add_argument("--readme", help="put the table into this README (between its marker comments) instead of printing it")
    args = p.parse_args(argv)
    if args.demo:
        text, marker = demo_table(args.demo), "fixture_table.py --demo"
    elif args.recovery:
        text, marker = recovery_table(args.recovery, tuple(args.archs.split(",")), args.defaults), "fixture_table.py --recovery"
    else:
        lines = header(CRITERIA)
        for arch in args.archs.split(","):
            path = os.path.join(args.tables, arch, "results.json")
            if os.path.exists(path):
                with open(path) as f:
                    lines += table_rows(json.load(f), LABELS.get(arch, arch))
        text, marker = "\n".join(lines), "fixture_table.py"
    if args.readme:
        put_in_readme(args.readme, marker, text)
    else:
        print(text)


if __name__ == "__main__":
    main()
