"""The README's fixture table, its demo table with the notes under it, and its recovery table are
exactly what benchmarks/fixture_table.py makes from the committed run folders
(benchmarks/results/tables/<arch>/, benchmarks/results/demo/, benchmarks/results/recovery/<arch>/ and
benchmarks/results/recovery_default/<arch>/): no number in them is typed by hand."""

import contextlib
import io
import json
import sys

import pytest

from tests.conftest import REPO


def made_by_fixture_table(*args: str) -> str:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import fixture_table
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    made = io.StringIO()
    with contextlib.redirect_stdout(made):
        fixture_table.main(list(args))
    return made.getvalue().strip()


def test_readme_fixture_table_comes_from_the_results():
    table = made_by_fixture_table()
    assert table.count("\n") > 20, table  # every fixture has rows
    assert table in (REPO / "README.md").read_text(), "README's fixture table is stale: paste `python benchmarks/fixture_table.py`"


def test_readme_demo_table_comes_from_the_demo_run():
    table = made_by_fixture_table("--demo")
    results = json.loads((REPO / "benchmarks" / "results" / "demo" / "results.json").read_text())
    assert table.count("\n| ") == len({(s["mode"], s["budget"]) for s in results["summary"]}), table  # a row per budget
    assert table in (REPO / "README.md").read_text(), \
        "README's demo table is stale: paste `python benchmarks/fixture_table.py --demo`"


def test_readme_recovery_table_comes_from_the_recovery_runs(capsys):
    """A row per mode and budget of the default criterion in each recovery run, every stage's mean
    over the seeds as the run's own summary has it, and the fine-tuned share of the unpruned metric;
    each run made with configs/recovery.py's recipe as it is now, and the unpruned model recovered
    alike named where that recipe trains on labels; the default's rows (configs/recovery_default.py,
    auto at each budget, three seeds) likewise."""
    from xprune_jax.experiments.prune import format_mean, format_metric, recovery_settings
    from xprune_jax.runs import config_module

    recipe = config_module(str(REPO / "configs" / "recovery.py"))
    table = made_by_fixture_table("--recovery")
    assert table in (REPO / "README.md").read_text(), \
        "README's recovery table is stale: paste `python benchmarks/fixture_table.py --recovery`"
    for folder in sorted((REPO / "benchmarks" / "results" / "recovery").iterdir()):
        results = json.loads((folder / "results.json").read_text())
        cells = [s for s in results["summary"] if s["criterion"] == "grad_x_act"]
        assert cells and all(s["n"] == 3 and "finetuned" in s for s in cells), folder.name
        for s in cells:
            share = s["finetuned"]["metric_mean"] / results["unpruned"]["metrics"][results["metric"]]
            assert f"| {share:.1%} |" in table
        made_with = json.loads((folder / "config.json").read_text())["recovery"]
        assert recovery_settings(made_with) == recovery_settings(recipe.get_config(results["arch"]).recovery.to_dict()), \
            f"{folder.name} was recovered with another recipe than configs/recovery.py's: run it again"
        alike = results["unpruned"].get("recovery", {}).get("finetuned")
        assert bool(alike) == ("task" in made_with["finetune"]["objective"]), folder.name
        if alike:
            assert f"; fine-tuned alike {format_metric(results['metric'], alike['metrics'][results['metric']])})" in table
    defaults = config_module(str(REPO / "configs" / "recovery_default.py"))
    for folder in sorted((REPO / "benchmarks" / "results" / "recovery_default").iterdir()):
        results = json.loads((folder / "results.json").read_text())
        made_with = json.loads((folder / "config.json").read_text())
        config = defaults.get_config(results["arch"])
        assert recovery_settings(made_with["recovery"]) == recovery_settings(config.recovery.to_dict()), \
            f"{folder.name}: run recovery_default.py again"
        assert (tuple(made_with["criteria"]), tuple(made_with["prunings"])) == (config.criteria, config.prunings)
        assert sorted(s["mode"] for s in results["summary"]) == ["auto", "auto"], folder.name
        for s in results["summary"]:
            assert s["n"] == 3 and "finetuned" in s, folder.name
            share = s["finetuned"]["metric_mean"] / results["unpruned"]["metrics"][results["metric"]]
            assert f"| auto {s['budget'].split('=')[1]} | {format_mean(results['metric'], s)} |" in table
            assert f"| {share:.1%} |" in table
    with pytest.raises(SystemExit) as stopped:
        made_by_fixture_table("--recovery=/nonexistent")
    assert stopped.value.code == 2 and "no <arch>/results.json of a recovery run under /nonexistent" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        made_by_fixture_table("--recovery", "--defaults=/nonexistent")
    assert stopped.value.code == 2 and "--defaults=/nonexistent is not a folder" in capsys.readouterr().err


def test_readme_tables_are_put_in_place_by_one_command(tmp_path):
    """`--readme` rewrites exactly the marked blocks: a stale README comes back to the committed one."""
    readme = (REPO / "README.md").read_text()
    demo, fixtures, recovery = made_by_fixture_table("--demo"), made_by_fixture_table(), made_by_fixture_table("--recovery")
    stale = tmp_path / "README.md"
    stale.write_text(readme.replace(demo, "| stale |").replace(fixtures, "| stale |\n| too |").replace(recovery, "| old |"))
    assert stale.read_text().count("| stale |") == 2 and stale.read_text().count("| old |") == 1
    made_by_fixture_table("--demo", f"--readme={stale}")
    made_by_fixture_table(f"--readme={stale}")
    made_by_fixture_table("--recovery", f"--readme={stale}")
    assert stale.read_text() == readme


def test_recovery_table_shows_a_fixtures_default_rows_before_its_recovery_table_exists(tmp_path):
    """A fixture with `recovery_default` rows and no recovery run yet gets its auto rows alone, after
    the fixtures that have both."""
    results = REPO / "benchmarks" / "results"
    for kind, arch in (("recovery", "mobilenet_v2"), ("defaults", "mobilenet_v2"), ("defaults", "retinanet_resnet50_fpn")):
        source = results / ("recovery" if kind == "recovery" else "recovery_default") / arch
        (tmp_path / kind / arch).mkdir(parents=True)
        for name in ("results.json", "measurements.json"):
            (tmp_path / kind / arch / name).write_bytes((source / name).read_bytes())
    table = made_by_fixture_table(f"--recovery={tmp_path / 'recovery'}", f"--defaults={tmp_path / 'defaults'}",
                                  "--archs=mobilenet_v2,retinanet_resnet50_fpn")
    rows = table.splitlines()[2:]
    assert [row.split(" | ")[1] for row in rows] == ["auto -30%", "auto -50%", "shrink -30%", "shrink -50%", "remove -30%",
                                                     "remove+shrink -50%", "auto -30%", "auto -50%"], table
    assert rows[0].startswith("| MobileNetV2 (") and rows[6].startswith("| RetinaNet (AP 0.567"), table
