"""Atomic writes: a result file is complete or absent, and readable like any file open() makes."""

import os

import pytest

from xprune_jax import runs
from xprune_jax.fileio import atomic_path


def test_atomic_path_replaces_only_on_success_with_the_usual_file_mode(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(str(path)) as tmp, open(tmp, "w") as f:
            f.write("half")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]
    with atomic_path(str(path)) as tmp, open(tmp, "w") as f:
        f.write("new")
    reference = tmp_path / "reference"
    reference.write_text("")
    assert path.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["reference", "results.json"]
    assert os.stat(path).st_mode & 0o777 == os.stat(reference).st_mode & 0o777


def test_figures_are_written_atomically(tmp_path):
    plt = runs.pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    runs.save_figure(fig, str(tmp_path / "plot.png"))
    assert os.listdir(tmp_path) == ["plot.png"]
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")
