"""The README's fixture table, and its demo table with the notes under it, are exactly what
benchmarks/fixture_table.py makes from the committed run folders (benchmarks/results/tables/<arch>/
and benchmarks/results/demo/): no number in them is typed by hand."""

import contextlib
import io
import json
import sys

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


def test_readme_tables_are_put_in_place_by_one_command(tmp_path):
    """`--readme` rewrites exactly the marked blocks: a stale README comes back to the committed one."""
    readme = (REPO / "README.md").read_text()
    demo, fixtures = made_by_fixture_table("--demo"), made_by_fixture_table()
    stale = tmp_path / "README.md"
    stale.write_text(readme.replace(demo, "| stale |").replace(fixtures, "| stale |\n| too |"))
    assert stale.read_text().count("| stale |") == 2
    made_by_fixture_table("--demo", f"--readme={stale}")
    made_by_fixture_table(f"--readme={stale}")
    assert stale.read_text() == readme
