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
