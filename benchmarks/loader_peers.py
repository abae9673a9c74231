"""Loader peers side by side, run by `make bench`: the same samples read to batched torch tensors
by every loader a user might pick, 0 and 2 DataLoader workers, page cache warm.

Two layouts:

- ``issue``: the loader issue's benchmark. 20,000 samples, each a 512-d image vector, a 100 x 40
  MFCC, a 16 x 2 x 14 x 14 flow tensor and a 384-d text vector, float16, batch 256; a synthetic
  store written once by the project's shard and catalog writers (`synthetic_store.py`);
- ``demo``: the demo store's train split (1,120 samples, float32, batch 64), audio alone and all
  4 groups, when `stores/demo` exists.

Loaders:

- raw `open().read()` of the shard files (the I/O ceiling, no decoding);
- plain `webdataset`: one `WebDataset(urls).decode().to_tuple(...)` pipeline per group (the
  store keeps one tar per group), zipped by key and batched into torch tensors;
- MosaicML Streaming: the same arrays written once with `streaming.MDSWriter` (one column per
  field, fixed dtype and shape), read by `streaming.StreamingDataset` through a torch
  DataLoader (streaming 0.13 with filelock 4 needs `_mosaic_worker_init` in forked workers, and
  one copy of the MDS files per worker count: see `run_case`);
- (demo only) a naive one-file-per-sample torch `Dataset` (one uncompressed `.npz` per sample);
- modalstore's StreamingLoader (catalog offsets, the default).

Every loader yields a label tensor and one tensor per field, variable-length fields zero-padded;
the peers keep the stored dtype (float16 in ``issue``), StreamingLoader casts float fields to
float32 (its batch contract), so it moves twice the bytes out. Each loader is built once and
iterated once per epoch, as a training loop does; with workers every DataLoader keeps them
between epochs (``persistent_workers``; StreamingLoader does so by itself). The loaders
alternate, one epoch each per round, so that the machine's load hits them alike; medians over
the rounds after a warm-up epoch each.
MosaicML is skipped, with a message, when `streaming` cannot be imported: its metadata pins
`transformers<5`, so it is not in the `bench` extra (BENCHMARKS.md says how to install it
without touching the venv's transformers).

Prints a markdown table and writes it to .bench/loader_peers.md.

    python benchmarks/loader_peers.py [--layout issue|demo|both] [--repeats 3]
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
ISSUE_SAMPLES, ISSUE_BATCH = 20_000, 256


def _import_streaming():
    """``streaming`` or the reason it cannot be imported."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import streaming
    except Exception as e:  # ImportError, or a dependency of it failing to import
        return None, f"{type(e).__name__}: {e}"
    return streaming, ""


def _train_urls(store_root: Path, groups: list[str]) -> dict[str, list[str]]:
    from pipelines.store import open_store

    store = open_store(store_root)
    return {g: [str(store.shard_path(g, s)) for s in store.shards("train")] for g in groups}


def _zip_decoded(urls: dict[str, list[str]], fields: dict[str, list[str]]):
    """Plain webdataset, one pipeline per group: ``WebDataset(urls).decode().to_tuple(...)``,
    zipped sample by sample (keys checked equal): ``{"__key__", "label", "<group>.<field>": array}``."""
    import webdataset as wds

    pipes = [
        wds.WebDataset(urls[g], shardshuffle=False)
        .decode()
        .to_tuple("__key__", "json", *(f"{f}.npy" for f in fields[g]))
        for g in fields
    ]
    for parts in zip(*pipes, strict=True):
        key = parts[0][0]
        if any(p[0] != key for p in parts):
            raise ValueError(f"key mismatch at {key}")
        merged = {"__key__": key, "label": int(parts[0][1]["label"])}
        for g, p in zip(fields, parts, strict=True):
            merged.update({f"{g}.{f}": v for f, v in zip(fields[g], p[2:], strict=True)})
        yield merged


def _wds_batches(urls, fields, batch):
    buf = []
    for sample in _zip_decoded(urls, fields):
        buf.append(sample)
        if len(buf) == batch:
            yield base._wds_collate(buf)
            buf = []
    if buf:
        yield base._wds_collate(buf)


def _fields(store_root: Path, groups: list[str]) -> dict[str, list[str]]:
    from pipelines.store import open_store

    store = open_store(store_root)
    return {g: sorted(store.field_specs(g)) for g in groups}


def joined_samples(store_root: Path, groups: list[str]) -> list[dict]:
    """The train split decoded by plain webdataset, groups joined by key (the batch layout of every loader)."""
    return list(_zip_decoded(_train_urls(store_root, groups), _fields(store_root, groups)))


def _epochs(iterable_factory):
    """An epoch function over a loader built once: (samples, seconds) per call."""
    loader = iterable_factory()

    def epoch() -> tuple[int, float]:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            n = sum(len(b["label"]) for b in loader)
        return n, time.perf_counter() - t0

    return epoch


def plain_webdataset(store_root: Path, groups: list[str], batch: int, workers: int):
    """Plain webdataset: the zipped pipelines as one IterableDataset (webdataset splits shards
    across workers), in a DataLoader kept between epochs."""
    import torch
    import webdataset as wds

    ds = wds.DataPipeline(
        partial(_wds_batches, _train_urls(store_root, groups), _fields(store_root, groups), batch)
    )
    if not workers:
        return _epochs(lambda: ds)
    return _epochs(
        lambda: torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=True)
    )


def modalstore(store_root: Path, groups: list[str], batch: int, workers: int):
    from fusion.loader import StreamingLoader

    loader = StreamingLoader(store_root, "train", groups=groups, batch_size=batch, num_workers=workers)

    def epoch() -> tuple[int, float]:
        t0 = time.perf_counter()
        n = sum(len(b["keys"]) for b in loader)
        return n, time.perf_counter() - t0

    return epoch


def raw_read(store_root: Path, groups: list[str]) -> tuple[int, float]:
    """``open().read()`` of the same shard files: the I/O ceiling. (samples, seconds)."""
    from pipelines.store import open_store

    store = open_store(store_root)
    paths = [store.shard_path(g, s) for s in store.shards("train") for g in groups]
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            f.read()
    return store.num_samples("train"), time.perf_counter() - t0


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


def mosaic(dataset, batch: int, workers: int, persistent: bool = False):
    """Epochs of a StreamingDataset (built once: shared memory, index) through a torch DataLoader;
    a fresh DataLoader (fresh workers) each epoch unless ``persistent``."""
    import torch

    def make():
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=batch,
            num_workers=workers,
            collate_fn=base._wds_collate,
            worker_init_fn=_mosaic_worker_init if workers else None,
            persistent_workers=bool(workers and persistent),
        )

    if persistent:
        return _epochs(make)

    def epoch() -> tuple[int, float]:
        return _epochs(make)()

    return epoch


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


def files(root: Path, batch: int, workers: int):
    import torch

    return _epochs(
        lambda: torch.utils.data.DataLoader(
            PerSampleFiles(root),
            batch_size=batch,
            num_workers=workers,
            collate_fn=base._wds_collate,
            persistent_workers=workers > 0,
        )
    )


# ---- the side-by-side run ----

RAW = "raw `open().read()` of the shard files (I/O ceiling)"
WDS = "plain webdataset (`WebDataset(...).decode().to_tuple(...)`, batched)"
MOSAIC = "MosaicML Streaming (`MDSWriter` + `StreamingDataset`)"
FILES = "one `.npz` file per sample, torch `Dataset`"
OURS = "modalstore StreamingLoader (catalog offsets)"


def _interleaved(fns: dict[str, object], repeats: int) -> dict[str, list[float]]:
    """Samples/s of each epoch fn over ``repeats`` rounds, one call per fn per round, the order
    rotated each round; one warm-up call each first. Checks every loader delivers the same count."""
    counts = {name: fn()[0] for name, fn in fns.items()}  # warm-up: imports, workers, page cache
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


def run_case(
    label: str,
    store_root: Path,
    groups: list[str],
    batch: int,
    repeats: int,
    tmp: Path,
    streaming,
    with_files: bool,
) -> tuple[list[str], list[str]]:
    """Table rows and summary lines of one layout, 0 and 2 workers."""
    rows, summary = [], []
    samples = joined_samples(store_root, groups)
    files_dir = tmp / "files"
    if with_files:
        write_files(samples, files_dir)
    mds_dir = tmp / "mds"
    if streaming is not None:
        write_mds(samples, mds_dir / "0")
        # A StreamingDataset iterated in-process and then through workers hangs in its shared
        # barrier (streaming 0.13), and two on one local directory clash: one copy per worker count.
        shutil.copytree(mds_dir / "0", mds_dir / "2")
    del samples
    ceiling = None
    for workers in (0, 2):
        fns = {WDS: plain_webdataset(store_root, groups, batch, workers)}
        if streaming is not None:
            fns[MOSAIC] = mosaic(open_mds(mds_dir / str(workers), batch), batch, workers, persistent=True)
        if with_files:
            fns[FILES] = files(files_dir, batch, workers)
        fns[OURS] = modalstore(store_root, groups, batch, workers)
        rates = _interleaved(fns, repeats)
        if workers == 0:  # right after the 0-worker rounds, not interleaved
            rates = {RAW: _interleaved({RAW: partial(raw_read, store_root, groups)}, repeats)[RAW], **rates}
            ceiling = float(np.median(rates[RAW]))
        med = {k: float(np.median(v)) for k, v in rates.items()}
        wds, ours = med[WDS], med[OURS]
        for name in rates:
            runs = ", ".join(f"{r:,.0f}" for r in rates[name])
            raw = name == RAW
            rows.append(
                f"| {label} | {name} | {0 if raw else workers} | {med[name]:,.0f} ({runs}) | "
                f"{'' if raw else f'{med[name] / wds:.2f}'} | {'' if raw else f'{ours / med[name]:.2f}'} | "
                f"{med[name] / ceiling:.1%} |"
            )
        mos = med.get(MOSAIC)
        summary.append(
            f"- {label}, {workers} workers: modalstore ÷ plain webdataset {ours / wds:.2f}× (target ≥ 10×), "
            + (f"÷ MosaicML {ours / mos:.2f}× (target ≥ 5×), " if mos else "MosaicML skipped, ")
            + f"{ours / ceiling:.1%} of the raw read (target ≥ 20 %)"
        )
        del fns
    return rows, summary


def issue_store(root: Path) -> Path:
    """The issue's layout, written once under ``root`` (reused while its store.json exists)."""
    from synthetic_store import ISSUE_SPEC, write_store

    if not (root / "store.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        write_store(root, ISSUE_SPEC, ISSUE_SAMPLES, samples_per_shard=1000)
    return root


def run(layouts: list[str], repeats: int) -> list[str]:
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
        "| layout | loader | workers | samples/s: median (runs) | × plain webdataset | modalstore ÷ this | % of raw read |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    summary, described = [], []
    bench = ROOT / ".bench"
    bench.mkdir(exist_ok=True)
    cases = []
    if "issue" in layouts:
        store = issue_store(bench / "issue_store")
        cases.append(
            (
                f"issue ({ISSUE_SAMPLES:,}, fp16)",
                store,
                ["image", "audio", "video", "text"],
                ISSUE_BATCH,
                False,
            )
        )
        described.append(
            f"issue: {ISSUE_SAMPLES:,} samples of 512 + 100×40 + 16×2×14×14 + 384 float16 (4 groups, "
            f"shards of 1,000), batch {ISSUE_BATCH}, written by `benchmarks/synthetic_store.py`"
        )
    if "demo" in layouts:
        if (STORE / "store.json").exists():
            for label, groups in base.LOADER_GROUPS.items():
                cases.append((f"demo {label}", STORE, groups, 64, True))
            described.append(
                f"demo: the demo store's train split ({base._train_samples()} samples, float32), batch 64"
            )
        else:
            notes.append("demo layout skipped: run `make features` first (stores/demo)")
    for label, store, groups, batch, with_files in cases:
        with tempfile.TemporaryDirectory(dir=bench, prefix="loader_peers-") as tmp:
            rows, summ = run_case(label, store, groups, batch, repeats, Path(tmp), streaming, with_files)
        lines += rows
        summary += summ
        print("\n".join(rows), flush=True)
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
        "; ".join(described)
        + f". Page cache warm, unshuffled, loaders alternating one epoch each per round, "
        f"medians of {repeats} rounds after a warm-up epoch each (raw read: right after the 0-worker rounds). "
        "Each loader is built once; worker processes persist across epochs (`persistent_workers`).",
        "",
        *summary,
        *([""] + notes if notes else []),
    ]
    return head + lines + tail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layout", choices=["issue", "demo", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    layouts = ["issue", "demo"] if args.layout == "both" else [args.layout]
    out = "\n".join(run(layouts, args.repeats))
    (ROOT / ".bench" / "loader_peers.md").write_text(out + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
