"""Batching: per-field columns of samples -> padded, masked, optionally standardised tensors.

``assemble`` takes, per field, parts of a batch (rows, values): one array for rows gathered at
once from a mapped shard (``fusion.shard_columns``), or a list of per-sample arrays (the
reference path, ``collate``). Both give the same bits: the arithmetic is elementwise, float16
-> float32 is exact, and a batch is standardised at once only where that is what the
per-sample formula computes anyway.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from features.spec import FieldSpec
from fusion.worker_batches import Arena, SlotPool


def sample_columns(samples: list[dict], groups, wanted) -> tuple[list[str], np.ndarray, dict, dict]:
    keys = [s["key"] for s in samples]
    label = np.array([s["label"] for s in samples], dtype=np.int64)
    present = {g: np.array([s["present"].get(g, False) for s in samples], dtype=bool) for g in groups}
    fields = {name: [s["fields"].get(name) for s in samples] for name in wanted}
    return keys, label, present, fields


def collate(
    samples: list[dict],
    specs: dict[str, FieldSpec],
    field_groups: dict[str, str],
    norm: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict:
    """Batch samples: stack fixed fields, zero-pad variable ones with lengths and masks.

    With ``norm`` ({field: (mean, std)}) present values are standardised; padding and
    missing samples stay zero.
    """
    keys, label, present, fields = sample_columns(samples, dict.fromkeys(field_groups.values()), specs)
    rows = np.arange(len(samples))
    return assemble(
        keys, label, present, {n: [(rows, v)] for n, v in fields.items()}, specs, field_groups, norm
    )


_SERIAL = 32768  # elements: torch copies smaller tensors on the calling thread (its grain size)


def _put(out: np.ndarray, rows: np.ndarray, v: np.ndarray, length: int | None = None) -> None:
    """``out[rows] = v`` (``out[rows, :length]`` for a sequence). float16 -> float32 goes through
    torch (exact either way; numpy's float16 cast is ~5x slower), in pieces below torch's grain
    size so that it stays on this thread: a parallel copy stalls whenever another process holds
    a core (on 2 shared cores: 10x slower)."""
    if v.dtype != np.float16 or out.dtype != np.float32 or not len(rows):
        if length is None:
            out[rows] = v
        else:
            out[rows, :length] = v
        return
    src = torch.from_numpy(np.ascontiguousarray(v))
    contiguous = rows[-1] - rows[0] + 1 == len(rows)  # rows ascend: cast straight into place
    if contiguous:
        dst = torch.from_numpy(out)[int(rows[0]) : int(rows[-1]) + 1]
        dst = dst if length is None else dst[:, :length]
    else:
        dst = torch.empty(src.shape, dtype=torch.float32)
    step = max(1, _SERIAL // max(1, math.prod(src.shape[1:])))
    for i in range(0, len(src), step):
        dst[i : i + step].copy_(src[i : i + step])
    if not contiguous:
        if length is None:
            out[rows] = dst.numpy()
        else:
            out[rows, :length] = dst.numpy()


def assemble(
    keys: list[str],
    label: np.ndarray,
    present: dict[str, np.ndarray],
    columns: dict[str, list[tuple[np.ndarray, Any]]],
    specs: dict[str, FieldSpec],
    field_groups: dict[str, str],
    norm: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    packed: bool = False,
    pool: SlotPool | None = None,
) -> dict:
    """``collate`` from columns: ``columns[field]`` holds (rows of the batch, values) parts, the
    values either one array (len(rows), ...) or a list of arrays (None: missing).

    ``packed``: every tensor in one shared-memory segment (from ``pool`` when given), returned
    packed (``fusion.worker_batches``).
    """
    b = len(keys)
    groups = list(dict.fromkeys(field_groups.values()))
    present = {g: np.asarray(present[g], bool) if g in present else np.zeros(b, bool) for g in groups}
    plans = []
    for name, spec in specs.items():
        dtype = np.dtype(np.float32) if np.dtype(spec.dtype).kind == "f" else np.dtype(spec.dtype)
        parts = columns.get(name, [])
        stats = norm.get(name) if norm is not None else None
        dtypes = {v.dtype for _, v in parts if isinstance(v, np.ndarray)}
        dtypes.update(a.dtype for _, v in parts if not isinstance(v, np.ndarray) for a in v if a is not None)
        # Standardise the whole batch at once where that gives the same bits as per sample:
        # when (array - mean) / std is computed in the batch's dtype anyway.
        batched = stats is not None and all(np.result_type(t, *stats) == dtype for t in dtypes)
        if stats is not None and not batched:
            mean, std = stats
            parts = [
                (
                    rows,
                    (v - mean) / std
                    if isinstance(v, np.ndarray)
                    else [None if a is None else (a - mean) / std for a in v],
                )
                for rows, v in parts
            ]
        lengths = None
        shape = (b, *spec.shape)
        if spec.variable:
            lengths = np.zeros(b, dtype=np.int64)
            first, rest = b, tuple(spec.shape[1:])  # the first present sample's frame shape
            for rows, v in parts:
                if isinstance(v, np.ndarray):
                    if len(rows):
                        lengths[rows] = v.shape[1]
                        if rows.min() < first:
                            first, rest = int(rows.min()), v.shape[2:]
                    continue
                for r, a in zip(rows.tolist(), v, strict=True):
                    if a is not None:
                        lengths[r] = a.shape[0]
                        if r < first:
                            first, rest = r, a.shape[1:]
            shape = (b, max(int(lengths.max()), 1), *rest)  # (batch, time, ...)
        plans.append((name, spec, dtype, parts, stats if batched else None, shape, lengths))
    if packed:
        items = [("label", None, (b,), np.int64), *(("present", g, (b,), bool) for g in groups)]
        for name, _, dtype, _, _, shape, lengths in plans:
            items.append(("features", name, shape, dtype))
            if lengths is not None:
                items += [("lengths", name, (b,), np.int64), ("mask", name, shape[:2], bool)]
        arena = Arena(items, pool)
        tensor = arena.tensor
    else:
        arena = None

        def tensor(part, name=None, shape=None, dtype=None):
            return torch.from_numpy(np.empty(shape, dtype))

    batch = {"keys": keys, "label": None, "features": {}, "lengths": {}, "mask": {}, "present": {}}
    batch["label"] = t = tensor("label", None, (b,), np.int64)
    t.numpy()[:] = label
    for g in groups:
        batch["present"][g] = t = tensor("present", g, (b,), bool)
        t.numpy()[:] = present[g]
    for name, _spec, dtype, parts, stats, shape, lengths in plans:
        batch["features"][name] = t = tensor("features", name, shape, dtype)
        out = t.numpy()
        if lengths is not None:
            for rows, v in parts:
                if isinstance(v, np.ndarray):
                    _put(out, rows, v, v.shape[1])
                    continue
                for r, a in zip(rows.tolist(), v, strict=True):
                    if a is not None:
                        out[r, : a.shape[0]] = a
            mask = np.arange(shape[1])[None, :] < lengths[:, None]  # (batch, time)
            out[~mask] = 0  # padding and missing samples
            if stats is not None:
                out -= stats[0]
                out /= stats[1]
                out[~mask] = 0
            batch["lengths"][name] = t = tensor("lengths", name, (b,), np.int64)
            t.numpy()[:] = lengths
            batch["mask"][name] = t = tensor("mask", name, shape[:2], bool)
            t.numpy()[:] = mask
        else:
            missing = np.ones(b, dtype=bool)
            for rows, v in parts:
                if isinstance(v, np.ndarray):
                    _put(out, rows, v)
                    missing[rows] = False
                    continue
                for r, a in zip(rows.tolist(), v, strict=True):
                    if a is not None:
                        out[r] = a
                        missing[r] = False
            out[missing] = 0
            if stats is not None:
                out -= stats[0]
                out /= stats[1]
                out[missing] = 0
    return arena.pack(keys) if arena is not None else batch
