"""The README's fixture table is exactly what benchmarks/fixture_table.py makes from the committed
run folders (benchmarks/results/tables/<arch>/results.json): no number in it is typed by hand."""

import contextlib
import io
import sys

from tests.conftest import REPO


def test_readme_fixture_table_comes_from_the_results():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import fixture_table
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    made = io.StringIO()
    with contextlib.redirect_stdout(made):
        fixture_table.main([])
    table = made.getvalue().strip()
    assert table.count("\n") > 20, table  # every fixture has rows
    assert table in (REPO / "README.md").read_text(), "README's fixture table is stale: paste `python benchmarks/fixture_table.py`"
