"""Batch perturbations: hide a modality (as the loader shows a missing one) or corrupt it with noise.

Used by modality dropout in training and by the missing-modality robustness evaluation. Each
returns a new batch dict; the input batch is not modified.
"""

from __future__ import annotations

import torch


def _copy(batch: dict) -> dict:
    out = {**batch}
    for key in ("present", "features", "mask", "lengths"):
        out[key] = dict(batch.get(key, {}))
    return out


def hide(batch: dict, group: str, rows: torch.Tensor | None = None) -> dict:
    """``group`` missing for the (batch,) bool ``rows`` (all rows when None).

    Missing looks exactly like the loader's missing modality: ``present`` False, zero features,
    no valid frame.
    """
    out = _copy(batch)
    present = out["present"].get(group)
    if present is None:
        present = torch.ones(out["label"].shape[0], dtype=torch.bool, device=out["label"].device)
    gone = torch.ones_like(present) if rows is None else rows.to(present.device).bool()
    out["present"][group] = present & ~gone
    for f, x in out["features"].items():
        if not f.startswith(group + "."):
            continue
        keep = (~gone).view(-1, *[1] * (x.dim() - 1))
        out["features"][f] = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
        if f in out["mask"]:
            out["mask"][f] = out["mask"][f] & (~gone)[:, None]
        if f in out["lengths"]:
            out["lengths"][f] = torch.where(gone, 0, out["lengths"][f])
    return out


def corrupt(batch: dict, group: str, scale: float = 1.0, seed: int = 0) -> dict:
    """Add Gaussian noise of ``scale`` x each field's standard deviation to ``group``'s valid values.

    The standard deviation is per field over the batch's valid entries; padding stays zero and a
    missing modality stays missing. ``seed`` makes the noise reproducible.
    """
    out = _copy(batch)
    gen = torch.Generator().manual_seed(seed)
    present = out["present"].get(group)
    for f, x in out["features"].items():
        if not f.startswith(group + "."):
            continue
        valid = torch.ones(x.shape[:1], dtype=torch.bool, device=x.device) if present is None else present
        valid = valid.view(-1, *[1] * (x.dim() - 1)).expand_as(x)
        if f in out["mask"]:
            frames = out["mask"][f].view(*out["mask"][f].shape, *[1] * (x.dim() - 2))
            valid = valid & frames.expand_as(x)
        xf = x.float()
        std = xf[valid].std() if valid.sum() > 1 else xf.new_tensor(0.0)
        noise = torch.randn(x.shape, generator=gen).to(x.device) * scale * std
        out["features"][f] = torch.where(valid, xf + noise, xf).to(x.dtype)
    return out
