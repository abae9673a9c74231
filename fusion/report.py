"""A markdown report over evaluated runs: one table row per run, the fusion margin, a bar chart."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from features.errors import ModalstoreError

COLUMNS = ("accuracy", "macro_recall", "macro_f1")
LABELS = {"accuracy": "accuracy", "macro_recall": "macro recall", "macro_f1": "macro F1"}


def read_metrics(runs_dir: str | Path) -> list[dict]:
    """Every ``runs_dir/*/metrics.json``: fusion runs first, then unimodal runs, each by name."""
    rows = [json.loads(p.read_text()) for p in Path(runs_dir).glob("*/metrics.json")]
    return sorted(rows, key=lambda r: (_is_unimodal(r), r["run"]))


def _is_unimodal(row: dict) -> bool:
    return row["model"] == "unimodal" or len(row["groups"]) == 1


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def write_report(runs_dir: str | Path) -> str:
    """Write ``runs_dir/report.md`` and ``report.png`` from the runs' metrics; return the markdown."""
    runs_dir = Path(runs_dir)
    rows = read_metrics(runs_dir)
    if not rows:
        raise ModalstoreError(f"{runs_dir}: no */metrics.json found; evaluate the runs first")
    splits = sorted({r["split"] for r in rows})
    classes = sorted({r["num_classes"] for r in rows})
    chance = ", ".join(f"{_pct(1 / c)} % ({c} classes)" for c in classes)

    lines = [
        f"# Fusion report: {runs_dir}",
        "",
        f"Split: {', '.join(splits)}. Scores in %; chance accuracy {chance}.",
        "",
        "| run | model | modalities | accuracy | macro recall | macro F1 | n |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        scores = " | ".join(_pct(r[c]) for c in COLUMNS)
        lines.append(f"| {r['run']} | {r['model']} | {' + '.join(r['groups'])} | {scores} | {r['n']} |")
    lines += ["", margin_line(rows), "", "![accuracy, macro recall and macro F1 per run](report.png)", ""]
    markdown = "\n".join(lines)

    _bar_chart(rows, runs_dir / "report.png")
    (runs_dir / "report.md").write_text(markdown)
    return markdown


def margin_line(rows: list[dict]) -> str:
    """One sentence comparing the best fusion run with the best unimodal run by accuracy."""
    fusion = [r for r in rows if not _is_unimodal(r)]
    unimodal = [r for r in rows if _is_unimodal(r)]
    if not fusion or not unimodal:
        return "No fusion/unimodal comparison: the report needs at least one run of each kind."
    best_f = max(fusion, key=lambda r: r["accuracy"])
    best_u = max(unimodal, key=lambda r: r["accuracy"])
    margin = 100 * (best_f["accuracy"] - best_u["accuracy"])
    return (
        f"Best fusion run **{best_f['run']}** ({_pct(best_f['accuracy'])} %) vs best unimodal run "
        f"**{best_u['run']}** ({_pct(best_u['accuracy'])} %): margin {margin:+.1f} points of accuracy."
    )


def _bar_chart(rows: list[dict], path: Path) -> None:
    # A bare Figure with the Agg canvas: no pyplot global state, no display needed.
    fig = Figure(figsize=(max(6.0, 1.2 * len(rows) + 2), 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(COLUMNS)
    for i, col in enumerate(COLUMNS):
        xs = [j + (i - (len(COLUMNS) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [100 * r[col] for r in rows], width=width, label=LABELS[col])
    ax.set_xticks(range(len(rows)), [r["run"] for r in rows], rotation=20, ha="right")
    chance = 100 / max(r["num_classes"] for r in rows)
    ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(f"{rows[0]['split']} split")
    ax.legend(loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=100)
