"""PNG figures for evaluation and reports: confusion matrix, learning curves, score bars.

Bare ``Figure`` objects on the Agg canvas: no pyplot global state, no display needed.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def confusion_png(matrix: list[list[int]], path: str | Path, title: str) -> None:
    """A confusion matrix (rows true, columns predicted) as a heat map with counts."""
    c = len(matrix)
    fig = _figure(max(4.0, 0.35 * c + 2), max(3.5, 0.35 * c + 1.5))
    ax = fig.add_subplot()
    im = ax.imshow(matrix, cmap="Blues")
    if c <= 20:
        peak = max(max(row) for row in matrix) or 1
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                if v:
                    color = "white" if v > peak / 2 else "black"
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=100)


def curves_png(logs: dict[str, list[dict]], path: str | Path, dashed: set[str] = frozenset()) -> None:
    """Learning curves: training loss and validation accuracy per epoch, one line per run.

    Runs named in ``dashed`` (the baselines) are drawn dashed.
    """
    fig = _figure(11, 4)
    ax_loss, ax_acc = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, rows in logs.items():
        rows = [r for r in rows if r.get("phase", "train") == "train"]
        epochs = [r["epoch"] for r in rows]
        style = "--" if name in dashed else "-"
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], style, label=name)
        ax_acc.plot(epochs, [100 * r["val_acc"] for r in rows], style, label=name)
    ax_loss.set(xlabel="epoch", ylabel="train loss", yscale="log", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="val accuracy (%)", ylim=(0, 100), title="validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=7, loc="lower right", ncol=2)
    fig.savefig(path, dpi=100)


def bars_png(
    names: list[str],
    columns: dict[str, list[float]],
    path: str | Path,
    title: str,
    chance: float | None = None,
) -> None:
    """Grouped bars (percent) per name, one colour per column."""
    fig = _figure(max(6.0, 0.9 * len(names) + 2), 4)
    ax = fig.add_subplot()
    width = 0.8 / len(columns)
    for i, (label, values) in enumerate(columns.items()):
        xs = [j + (i - (len(columns) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [100 * v for v in values], width=width, label=label)
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right")
    if chance is not None:
        ax.axhline(100 * chance, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=100)
