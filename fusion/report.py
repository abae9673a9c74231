"""A markdown report over evaluated runs: comparison table (mean ± std over seeds), fusion margin,
missing-modality robustness, per-class scores of the best fusion run, and plots.

``write_report(runs_dir, ...)`` reads every ``*/metrics.json`` (and ``log.jsonl``) below the
given folders and writes ``report.md``, ``report.png`` (scores per run) and ``curves.png``
(learning curves) into the first folder (or ``out_dir``).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from features.errors import ModalstoreError
from fusion.plots import bars_png, curves_png

COLUMNS = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "micro_f1")
LABELS = {
    "accuracy": "accuracy",
    "macro_precision": "macro precision",
    "macro_recall": "macro recall",
    "macro_f1": "macro F1",
    "micro_f1": "micro F1",
}


def read_metrics(*runs_dirs: str | Path) -> list[dict]:
    """Every ``*/metrics.json`` of the folders, each with ``dir`` (its run folder) and ``name``.

    ``name`` is the run without its seed suffix, prefixed with the folder name when several
    folders are read. Fusion runs come first, then unimodal runs, each by name.
    """
    rows = []
    for d in runs_dirs:
        for p in sorted(Path(d).glob("*/metrics.json")):
            r = json.loads(p.read_text())
            base = r.get("base_run", r["run"])
            r["dir"] = p.parent
            r["name"] = f"{Path(d).name}/{base}" if len(runs_dirs) > 1 else base
            rows.append(r)
    return sorted(rows, key=lambda r: (_is_unimodal(r), r["name"], r.get("seed") or 0))


def _is_unimodal(row: dict) -> bool:
    return row["model"] == "unimodal" or len(row["groups"]) == 1


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return _pct(values[0])
    return f"{_pct(statistics.mean(values))} ± {_pct(statistics.stdev(values))}"


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per run name: its seeds' rows and the mean of each score."""
    by_name: dict[str, list[dict]] = {}
    for r in rows:
        by_name.setdefault(r["name"], []).append(r)
    out = []
    for name, runs in by_name.items():
        mean = {c: statistics.mean(r[c] for r in runs) for c in COLUMNS}
        out.append({"name": name, "runs": runs, "mean": mean, "first": runs[0]})
    return out


def write_report(*runs_dirs: str | Path, out_dir: str | Path | None = None) -> str:
    """Write ``report.md``, ``report.png`` and ``curves.png``; return the markdown."""
    if not runs_dirs:
        raise ModalstoreError("report: name at least one folder of evaluated runs")
    out_dir = Path(out_dir or runs_dirs[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = read_metrics(*runs_dirs)
    if not rows:
        raise ModalstoreError(
            f"{', '.join(map(str, runs_dirs))}: no */metrics.json found; evaluate the runs first"
        )
    runs = summarise(rows)
    splits = sorted({r["split"] for r in rows})
    classes = sorted({r["num_classes"] for r in rows})
    chance = ", ".join(f"{_pct(1 / c)} % ({c} classes)" for c in classes)
    seeds = max(len(s["runs"]) for s in runs)

    lines = [
        f"# Fusion report: {', '.join(map(str, runs_dirs))}",
        "",
        f"Split: {', '.join(splits)}. Scores in %; chance accuracy {chance}."
        + (f" Mean ± standard deviation over {seeds} seeds." if seeds > 1 else ""),
        "",
        "| run | model | modalities | seeds | " + " | ".join(LABELS[c] for c in COLUMNS) + " | n |",
        "|---|---|---|---:|" + "---:|" * len(COLUMNS) + "---:|",
    ]
    for s in runs:
        first = s["first"]
        scores = " | ".join(_mean_std([r[c] for r in s["runs"]]) for c in COLUMNS)
        lines.append(
            f"| {s['name']} | {first['model']} | {' + '.join(first['groups'])} | {len(s['runs'])} | "
            f"{scores} | {first['n']} |"
        )
    lines += ["", margin_line(runs), ""]
    lines += _robustness_section(runs)
    lines += _regression_section(runs)
    lines += _per_class_section(runs, out_dir)
    lines += [
        "## Plots",
        "",
        "![accuracy and macro F1 per run](report.png)",
        "",
        "![training loss and validation accuracy per epoch](curves.png)",
        "",
    ]
    markdown = "\n".join(lines)

    bars_png(
        [s["name"] for s in runs],
        {LABELS[c]: [s["mean"][c] for s in runs] for c in ("accuracy", "macro_f1")},
        out_dir / "report.png",
        f"{', '.join(splits)} split",
        chance=1 / max(classes),
    )
    logs = {}
    for s in runs:
        log = s["first"]["dir"] / "log.jsonl"
        if log.exists():
            logs[s["name"]] = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    curves_png(logs, out_dir / "curves.png", dashed={s["name"] for s in runs if _is_unimodal(s["first"])})
    (out_dir / "report.md").write_text(markdown)
    return markdown


def margin_line(runs: list[dict]) -> str:
    """One sentence comparing the best fusion run with the best unimodal run by (mean) accuracy."""
    fusion = [s for s in runs if not _is_unimodal(s["first"])]
    unimodal = [s for s in runs if _is_unimodal(s["first"])]
    if not fusion or not unimodal:
        return "No fusion/unimodal comparison: the report needs at least one run of each kind."
    best_f = max(fusion, key=lambda s: s["mean"]["accuracy"])
    best_u = max(unimodal, key=lambda s: s["mean"]["accuracy"])
    margin = 100 * (best_f["mean"]["accuracy"] - best_u["mean"]["accuracy"])
    worst_f = min(fusion, key=lambda s: s["mean"]["accuracy"])
    return (
        f"Best fusion run **{best_f['name']}** ({_pct(best_f['mean']['accuracy'])} %) vs best unimodal run "
        f"**{best_u['name']}** ({_pct(best_u['mean']['accuracy'])} %): margin {margin:+.1f} points of accuracy; "
        f"the weakest fusion run, **{worst_f['name']}**, has {_pct(worst_f['mean']['accuracy'])} %."
    )


def _robustness_section(runs: list[dict]) -> list[str]:
    with_rob = [s for s in runs if all("robustness" in r for r in s["runs"])]
    if not with_rob:
        return []
    groups = list(dict.fromkeys(g for s in with_rob for g in s["first"]["groups"]))
    scale = with_rob[0]["first"]["robustness"]["noise_scale"]
    lines = [
        "## Missing-modality robustness",
        "",
        f"Accuracy drop in points from the clean accuracy: **−g** with modality g masked out (as if "
        f"missing), **~g** with Gaussian noise of {scale:g} × the feature's standard deviation added to it. "
        "Blank: the run does not use that modality.",
        "",
        "| run | clean | "
        + " | ".join(f"−{g}" for g in groups)
        + " | "
        + " | ".join(f"~{g}" for g in groups)
        + " |",
        "|---|---:|" + "---:|" * (2 * len(groups)),
    ]
    for s in with_rob:
        cells = []
        for kind in ("masked", "noise"):
            for g in groups:
                if g not in s["first"]["groups"]:
                    cells.append("")
                    continue
                drops = [r["accuracy"] - r["robustness"][kind][g] for r in s["runs"]]
                cells.append(f"{100 * statistics.mean(drops):+.1f}")
        lines.append(f"| {s['name']} | {_pct(s['mean']['accuracy'])} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _regression_section(runs: list[dict]) -> list[str]:
    reg = [s for s in runs if all("regression" in r for r in s["runs"])]
    if not reg:
        return []
    lines = ["## Regression heads", "", "| run | MSE | MAE |", "|---|---:|---:|"]
    for s in reg:
        mse = statistics.mean(r["regression"]["mse"] for r in s["runs"])
        mae = statistics.mean(r["regression"]["mae"] for r in s["runs"])
        lines.append(f"| {s['name']} | {mse:.4f} | {mae:.4f} |")
    return [*lines, ""]


def _per_class_section(runs: list[dict], out_dir: Path) -> list[str]:
    fusion = [s for s in runs if not _is_unimodal(s["first"])] or runs
    best = max(fusion, key=lambda s: s["mean"]["accuracy"])["first"]
    if "per_class" not in best:
        return []
    lines = [
        f"## Per-class scores of {best['run']}",
        "",
        "| class | precision | recall | F1 | support |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in best["per_class"]:
        lines.append(
            f"| {row['class']} | {_pct(row['precision'])} | {_pct(row['recall'])} | {_pct(row['f1'])} | "
            f"{row['support']} |"
        )
    confusion = best["dir"] / "confusion.png"
    if confusion.exists():
        try:
            rel = confusion.relative_to(out_dir)
        except ValueError:
            rel = confusion.resolve()
        lines += ["", f"![confusion matrix of {best['run']}]({rel.as_posix()})"]
    return [*lines, ""]
