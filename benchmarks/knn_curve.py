"""The picture of ``knn_fashion.py``'s results: k-NN top-1 against training minutes, one line per
method, with each method's random-init figure and the raw-pixel k-NN as horizontal lines.

    python benchmarks/knn_curve.py OUT/results.json [--png FILE]   # default: OUT/knn_curve.png

``knn_fashion.py`` draws it after every sitting; this entry point redraws it from a results file.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def curve_series(results: dict) -> dict[str, list[tuple[float, float]]]:
    """``{method: [(training minutes, k-NN top-1), ...]}`` sorted by minutes. The x value is the
    time the run actually trained (``fit_s``) where recorded, else its budget."""
    series: dict[str, list[tuple[float, float]]] = {}
    for run in results.get("runs", []):
        minutes = run["fit_s"] / 60 if run.get("fit_s") else float(run["minutes"])
        series.setdefault(run["method"], []).append((minutes, float(run["knn_top1"])))
    return {method: sorted(points) for method, points in series.items()}


def reference_lines(results: dict) -> dict[str, float]:
    """The horizontal lines: ``"<method> random init"`` per method, ``"raw pixels (<size> px)"``."""
    lines = {f"{method} random init": float(info["random_init"])
             for method, info in results.get("methods", {}).items()}
    lines.update({f"raw pixels ({size} px)": float(value) for size, value in results.get("raw_pixels", {}).items()})
    return lines


def draw_curve(results: dict, png: Path, title: str = "Fashion-MNIST test split, weighted k-NN (k=20)") -> Path:
    """Write the curve of ``results`` (the ``knn_fashion.py`` results dict) to ``png``."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    series = curve_series(results)
    if not series:
        raise ValueError("the results hold no finished run to draw")
    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    colours = {}
    for method, points in series.items():
        (line,) = axes.plot([m for m, _ in points], [a for _, a in points], marker="o", label=method)
        colours[method] = line.get_color()
    for label, value in reference_lines(results).items():
        method = label.removesuffix(" random init")
        axes.axhline(value, linestyle="--" if method in colours else ":", linewidth=1,
                     color=colours.get(method, "grey"), label=label)
    axes.set_xlabel("training minutes")
    axes.set_ylabel("k-NN top-1")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png)
    plt.close(figure)
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a results.json of knn_fashion.py")
    parser.add_argument("--png", type=Path, default=None, help="default: knn_curve.png beside the results")
    args = parser.parse_args()
    png = args.png or args.results.parent / "knn_curve.png"
    print(draw_curve(json.loads(args.results.read_text()), png))


if __name__ == "__main__":
    main()
