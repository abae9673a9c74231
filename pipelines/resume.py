"""Resuming an interrupted extraction: each finished shard leaves its catalog rows in
``STORE/.extract/parts/<shard>.json``; a later run with the same identity reuses every shard
whose part and tar files are intact, and recomputes only the rest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.shards import ShardPlan, write_atomic

STATE_DIR = ".extract"  # run identity and finished shards' catalog rows, while a run is incomplete


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype), "shape": list(obj.shape)}
    if isinstance(obj, dict):
        return {k: _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _from_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return np.array(obj["__ndarray__"], dtype=obj["dtype"]).reshape(obj["shape"])
        return {k: _from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_jsonable(v) for v in obj]
    return obj


def part_path(store: Path, shard: str) -> Path:
    return store / STATE_DIR / "parts" / f"{shard}.json"


def save_part(store: Path, result: dict) -> None:
    """Record a finished shard (its catalog rows) so an interrupted run can resume after it."""
    body = {k: v for k, v in result.items() if k != "seconds"}
    # key order is column order in the catalog: keep it
    write_atomic(part_path(store, result["shard"]), json.dumps(_to_jsonable(body)).encode())


def load_part(store: Path, plan: ShardPlan, tasks: tuple) -> dict | None:
    """A finished shard's result, if its part and every group's tar are present and intact."""
    path = part_path(store, plan.name)
    if not path.exists():
        return None
    try:
        result = _from_jsonable(json.loads(path.read_text()))
    except ValueError:
        return None
    files = {f["group"]: f for f in result["files"]}
    for task in tasks:
        f = files.get(task.name)
        tar = store / "shards" / task.name / f"{plan.name}.tar"
        if f is None or not tar.exists() or tar.stat().st_size != f["bytes"]:
            return None
    result["seconds"] = 0.0
    return result
