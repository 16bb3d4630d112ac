import torch
from PIL import Image

from analysis import plots

PNG = b"\x89PNG\r\n\x1a\n"


def _valid_png(path):
    assert path.read_bytes()[:8] == PNG
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] > 100 and image.size[1] > 100


def test_every_plot_writes_a_valid_png(tmp_path):
    files = [
        plots.plot_load(torch.tensor([3.0, 1.0, 0.0, 4.0]), tmp_path / "a" / "load.png"),
        plots.plot_load({"x": [1, 2], "y": [2, 2]}, tmp_path / "grouped.png"),
        plots.plot_cv_over_steps({"x": [1.0, 0.5, 0.2], "y": [0.0, 0.0]}, tmp_path / "cv.png"),
        plots.plot_heatmap(torch.tensor([[1, 2], [0, 0], [3, 1]]), tmp_path / "heat.png"),
        plots.plot_coactivation([[1, 0], [0, 1]], tmp_path / "coact.png"),
    ]
    for path in files:
        _valid_png(path)


def test_heatmap_grid(tmp_path):
    tables = {f"r{i}": torch.rand(4, 3) for i in range(5)}
    _valid_png(plots.plot_heatmap_grid(tables, tmp_path / "grid.png", columns=2))


def test_load_table_for_many_series_and_bad_input(tmp_path):
    loads = {f"router{i}": torch.arange(6.0) * i for i in range(6)}  # router0 is all zero
    _valid_png(plots.plot_load(loads, tmp_path / "table.png"))
    import pytest

    with pytest.raises(ValueError, match="1-D"):
        plots.plot_load(torch.zeros(2, 2), tmp_path / "bad.png")
    with pytest.raises(ValueError, match="normalise"):
        plots.plot_heatmap(torch.ones(2, 2), tmp_path / "bad.png", normalise="diag")
