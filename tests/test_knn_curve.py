"""benchmarks/knn_curve.py: the series it draws come from the results as knn_fashion.py writes
them, and the PNG holds a picture (not a blank canvas)."""
import importlib.util
from pathlib import Path

import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "knn_curve.py"

RESULTS = {
    "raw_pixels": {"24": 0.857},
    "methods": {"dino": {"random_init": 0.621}, "dinov2": {"random_init": 0.6}},
    "runs": [
        dict(method="dinov2", minutes=10, steps=1325, fit_s=636.0, knn_top1=0.756),
        dict(method="dinov2", minutes=5, steps=603, fit_s=270.0, knn_top1=0.738),
        dict(method="dino", minutes=5, steps=700, knn_top1=0.727),  # an older row without fit_s
    ],
}


@pytest.fixture(scope="module")
def knn_curve():
    spec = importlib.util.spec_from_file_location("knn_curve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_series_use_the_trained_minutes_in_order(knn_curve):
    series = knn_curve.curve_series(RESULTS)
    assert series == {"dinov2": [(4.5, 0.738), (10.6, 0.756)], "dino": [(5.0, 0.727)]}
    assert knn_curve.reference_lines(RESULTS) == {"dino random init": 0.621, "dinov2 random init": 0.6,
                                                 "raw pixels (24 px)": 0.857}


def test_png_is_drawn(knn_curve, tmp_path):
    png = knn_curve.draw_curve(RESULTS, tmp_path / "curve.png")
    image = Image.open(png).convert("L")
    assert image.size == (768, 504)  # 6.4 x 4.2 inches at 120 dpi
    lo, hi = image.getextrema()
    assert hi - lo > 100  # lines and text on a white canvas


def test_nothing_to_draw_is_an_error(knn_curve, tmp_path):
    with pytest.raises(ValueError, match="no finished run"):
        knn_curve.draw_curve({"runs": []}, tmp_path / "curve.png")
