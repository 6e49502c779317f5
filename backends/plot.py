"""`fedlang run --plot FILE.png`: the metrics of a run, one panel per metric, by round."""

from __future__ import annotations

import json
import math
from pathlib import Path

_NOT_PLOTTED = {"round", "seconds", "skipped"}


def plot_metrics(metrics_path: Path, out: Path, title: str) -> None:
    """Draw every numeric metric of metrics.jsonl against the round (matplotlib, no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    series: dict[str, list[tuple[int, float]]] = {}
    for line in lines:
        for key, value in line.items():
            if key in _NOT_PLOTTED or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                series.setdefault(key, []).append((line["round"] + 1, value))
    if not series:
        raise ValueError(f"{metrics_path} has no numeric metrics to plot")
    for key in ("clients", "dropped"):          # bookkeeping: only worth a panel when it varies
        if key in series and len({v for _, v in series[key]}) == 1:
            del series[key]
    keys = sorted(series, key=lambda k: (k in ("clients", "dropped"), k))
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        xs, ys = zip(*series[key])
        ax.plot(xs, ys, marker="." if len(xs) < 60 else None, linewidth=1.5)
        ax.set_title(key)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
