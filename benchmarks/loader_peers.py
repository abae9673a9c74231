"""Loader peers side by side, run by `make bench`: the demo store's train split read to batched
torch tensors by every loader a user might pick, 0 and 2 DataLoader workers, page cache warm.

- raw `open().read()` of the shard files (the I/O ceiling, no decoding);
- plain `webdataset` (`benchmarks/run.py`'s baseline: one pipeline per group, zipped by key);
- MosaicML Streaming: the same arrays written once with `streaming.MDSWriter` (one column per
  field, fixed dtype and shape where the split has one), read by `streaming.StreamingDataset`
  through a torch DataLoader (streaming 0.13 with filelock 4 needs `_mosaic_worker_init` in
  forked workers, and one copy of the MDS files per worker count: see `run`);
- a naive one-file-per-sample torch `Dataset` (one uncompressed `.npz` per sample);
- modalstore's StreamingLoader (catalog offsets, the default).

Every loader yields the same batches: a label tensor and one float32 tensor per field
(`_wds_collate` of run.py for all but StreamingLoader). The loaders alternate, one epoch each
per round, so that the machine's load hits them alike; medians over the rounds after a warm-up
epoch each. MosaicML is skipped, with a message, when `streaming` cannot be imported: its
metadata pins `transformers<5`, so it is not in the `bench` extra (BENCHMARKS.md says how to
install it without touching the venv's transformers).

Prints a markdown table and writes it to .bench/loader_peers.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import run as base  # noqa: E402  (benchmarks/run.py: the same baselines as its loader table)

STORE = base.STORE


def _import_streaming():
    """``streaming`` or the reason it cannot be imported."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import streaming
    except Exception as e:  # ImportError, or a dependency of it failing to import
        return None, f"{type(e).__name__}: {e}"
    return streaming, ""


def _train_urls(groups: list[str]) -> dict[str, list[str]]:
    from pipelines.store import open_store

    store = open_store(STORE)
    return {g: [str(store.shard_path(g, s)) for s in store.shards("train")] for g in groups}


def joined_samples(groups: list[str]) -> list[dict]:
    """The train split decoded as plain webdataset gives it, groups joined by key:
    ``{"__key__", "label", "<group>.<field>": array}`` (the batch layout of every loader here)."""
    import webdataset as wds

    urls = _train_urls(groups)
    pipes = [wds.WebDataset(urls[g], shardshuffle=False).map(base._wds_decode) for g in groups]
    out = []
    for parts in zip(*pipes, strict=True):
        key = parts[0]["__key__"]
        if any(p["__key__"] != key for p in parts):
            raise ValueError(f"key mismatch at {key}")
        merged = {"__key__": key, "label": int(parts[0]["label"])}
        for g, p in zip(groups, parts, strict=True):
            merged.update({f"{g}.{k}": v for k, v in p.items() if k not in ("__key__", "label")})
        out.append(merged)
    return out


# ---- MosaicML Streaming ----


def mds_columns(samples: list[dict]) -> dict[str, str]:
    """MDS column encodings: ``ndarray:<dtype>:<shape>`` where every sample has the same dtype and
    shape (no per-sample header), plain ``ndarray`` (dtype and shape stored per sample) otherwise."""
    columns = {"__key__": "str", "label": "int"}
    for k in samples[0]:
        if k in columns:
            continue
        kinds = {(s[k].dtype.name, s[k].shape) for s in samples}
        if len(kinds) == 1:
            dtype, shape = kinds.pop()
            columns[k] = f"ndarray:{dtype}:{','.join(map(str, shape))}"
        else:
            columns[k] = "ndarray"
    return columns


def write_mds(samples: list[dict], out: Path) -> None:
    """The samples as one MDS dataset, MDSWriter's defaults (no compression, 64 MB shards)."""
    from streaming import MDSWriter

    with MDSWriter(out=str(out), columns=mds_columns(samples), progress_bar=False) as writer:
        for s in samples:
            writer.write(s)


def open_mds(local: Path, batch: int):
    """A StreamingDataset over a local MDS directory (no remote), unshuffled, as the others."""
    from streaming import StreamingDataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # num_canonical_nodes / shuffle_block_size defaults
        return StreamingDataset(local=str(local), batch_size=batch, shuffle=False)


def _mosaic_worker_init(_worker_id: int) -> None:
    """Give a forked DataLoader worker its own FileLocks. StreamingDataset creates its shared
    barrier's FileLock in the parent; filelock >= 4 refuses a lock inherited across fork
    ("was inherited across fork; construct a new instance"), which streaming 0.13 (tested with
    filelock 3) does not expect. Dropping them makes streaming recreate them lazily, as it does
    in spawned workers; nothing is held at fork time, so this changes no locking."""
    import torch

    dataset = torch.utils.data.get_worker_info().dataset
    for obj, attr in ((dataset._shared_barrier, "lock"), (dataset, "_cache_filelock")):
        if hasattr(obj, attr):
            delattr(obj, attr)


def mosaic_loader(dataset, batch: int, num_workers: int) -> tuple[int, float]:
    """One epoch of a StreamingDataset through a fresh torch DataLoader (fresh workers each epoch,
    like the other loaders here); the dataset object is built once (shared memory, index)."""
    import torch

    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        num_workers=num_workers,
        collate_fn=base._wds_collate,
        worker_init_fn=_mosaic_worker_init if num_workers else None,
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = sum(len(b["label"]) for b in loader)
    return n, time.perf_counter() - t0


# ---- naive one-file-per-sample Dataset ----


def write_files(samples: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for s in samples:
        arrays = {k: v for k, v in s.items() if k not in ("__key__", "label")}
        np.savez(out / f"{s['__key__']}.npz", label=np.int64(s["label"]), **arrays)


class PerSampleFiles:
    """A map-style torch Dataset: one ``.npz`` per sample, ``np.load`` in ``__getitem__``."""

    def __init__(self, root: Path) -> None:
        self.paths = sorted(root.glob("*.npz"))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        with np.load(self.paths[i], allow_pickle=False) as z:
            sample = {k: z[k] for k in z.files if k != "label"}
            sample["label"] = int(z["label"])
        return sample


def files_loader(root: Path, batch: int, num_workers: int) -> tuple[int, float]:
    import torch

    loader = torch.utils.data.DataLoader(
        PerSampleFiles(root), batch_size=batch, num_workers=num_workers, collate_fn=base._wds_collate
    )
    t0 = time.perf_counter()
    n = sum(len(b["label"]) for b in loader)
    return n, time.perf_counter() - t0


# ---- the side-by-side run ----

RAW = "raw `open().read()` of the shard files (I/O ceiling)"
MOSAIC = "MosaicML Streaming (`MDSWriter` + `StreamingDataset`)"
OURS = "modalstore StreamingLoader (catalog offsets)"


def _interleaved(fns: dict[str, object], repeats: int) -> dict[str, list[float]]:
    """Samples/s of each fn over ``repeats`` rounds, one call per fn per round, the order rotated
    each round; one warm-up call each first. Checks every loader delivers the same sample count."""
    counts = {name: fn()[0] for name, fn in fns.items()}  # warm-up: imports, page cache, files
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"loaders disagree on the number of samples: {counts}")
    rates: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            n, t = fns[name]()[:2]
            rates[name].append(n / t)
    return rates


def run(batch: int, repeats: int, group_sets: dict[str, list[str]]) -> list[str]:
    streaming, why = _import_streaming()
    load0 = os.getloadavg()
    t_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    notes = []
    if streaming is None:
        notes.append(
            f"MosaicML Streaming skipped: `import streaming` failed ({why}). Install it without its "
            "pins (they would downgrade transformers and numpy): `pip install --no-deps "
            "mosaicml-streaming && pip install Brotli python-snappy zstd 'xxhash<4' catalogue` (BENCHMARKS.md)."
        )
        print(notes[-1], file=sys.stderr)
    lines = [
        "| groups | loader | workers | samples/s: median (runs) | × plain webdataset | modalstore ÷ this | % of raw read |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    summary = []
    (ROOT / ".bench").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / ".bench", prefix="loader_peers-") as tmp:
        for label, groups in group_sets.items():
            samples = joined_samples(groups)
            files = Path(tmp) / label.replace(" ", "_") / "files"
            write_files(samples, files)
            mds_dir = Path(tmp) / label.replace(" ", "_") / "mds"
            if streaming is not None:
                write_mds(samples, mds_dir / "0")
                # A StreamingDataset iterated in-process and then through workers hangs in its shared
                # barrier (streaming 0.13), and two on one local directory clash: one copy of the same
                # files per worker count.
                shutil.copytree(mds_dir / "0", mds_dir / "2")
            del samples
            for workers in (0, 2):
                mds = open_mds(mds_dir / str(workers), batch) if streaming is not None else None
                fns = {"plain webdataset": partial(base.plain_webdataset, batch, groups, workers)}
                if mds is not None:
                    fns[MOSAIC] = partial(mosaic_loader, mds, batch, workers)
                fns["one `.npz` file per sample, torch `Dataset`"] = partial(
                    files_loader, files, batch, workers
                )
                fns[OURS] = partial(base.modalstore_loader, batch, groups, workers, True)
                rates = _interleaved(fns, repeats)
                if workers == 0:  # microseconds a round: right after the 0-worker rounds, not interleaved
                    rates = {RAW: _interleaved({RAW: partial(base.raw_read, groups)}, repeats)[RAW], **rates}
                    ceiling = float(np.median(rates[RAW]))
                med = {k: float(np.median(v)) for k, v in rates.items()}
                wds, ours = med["plain webdataset"], med[OURS]
                for name in rates:
                    runs = ", ".join(f"{r:,.0f}" for r in rates[name])
                    raw = name == RAW
                    lines.append(
                        f"| {label} | {name} | {0 if raw else workers} | {med[name]:,.0f} ({runs}) | "
                        f"{'' if raw else f'{med[name] / wds:.2f}'} | {'' if raw else f'{ours / med[name]:.2f}'} | "
                        f"{med[name] / ceiling:.1%} |"
                    )
                mosaic = med.get(MOSAIC)
                summary.append(
                    f"- {label}, {workers} workers: modalstore ÷ plain webdataset {ours / wds:.2f}× (target ≥ 10×), "
                    + (f"÷ MosaicML {ours / mosaic:.2f}× (target ≥ 5×), " if mosaic else "MosaicML skipped, ")
                    + f"{ours / ceiling:.1%} of the raw read (target ≥ 20 %)"
                )
                del mds, fns
    load1 = os.getloadavg()
    versions = [
        f"torch {__import__('torch').__version__}",
        f"webdataset {__import__('webdataset').__version__}",
    ]
    if streaming is not None:
        versions.append(f"mosaicml-streaming {streaming.__version__}")
    head = [
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{', '.join(versions)}; started {t_start}; load average (1/5/15 min) "
        f"{load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f} at the start, {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f} at the end",
        "",
    ]
    tail = [
        "",
        f"Demo store train split ({base._train_samples()} samples), batch {batch}, page cache warm, loaders "
        f"alternating one epoch each per round, medians of {repeats} rounds after a warm-up epoch each "
        "(raw read: measured right after the 0-worker rounds). With workers every epoch starts fresh "
        "DataLoader worker processes.",
        "",
        *summary,
        *([""] + notes if notes else []),
    ]
    return head + lines + tail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--groups", choices=["audio", "all 4", "both"], default="both")
    args = ap.parse_args()
    if not (STORE / "store.json").exists():
        print("run `make features` first (demo store)", file=sys.stderr)
        return 2
    sets = base.LOADER_GROUPS if args.groups == "both" else {args.groups: base.LOADER_GROUPS[args.groups]}
    out = "\n".join(run(args.batch, args.repeats, sets))
    (ROOT / ".bench" / "loader_peers.md").write_text(out + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
