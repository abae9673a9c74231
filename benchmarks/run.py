"""Benchmarks, run by `make bench`: ratios against baselines measured in the same process.

1. MFCC extraction of the demo audio: a bare single-process librosa loop (baseline) vs
   `modalstore extract` serially and on a 2-worker Dask LocalCluster, end to end
   including decoding and writing the store.
2. Loading the demo store's train split to batched tensors, audio alone and all four groups,
   0 and 2 DataLoader workers: plain `webdataset` (`WebDataset(...).map(np.load).batched(...)`,
   one pipeline per group zipped by key) vs StreamingLoader by tar iteration (`fast=False`)
   and by catalog offsets (default), against a raw `open().read()` of the same files.

Figures are printed as a markdown table and written to .bench/results.md; copy them into
BENCHMARKS.md with the machine and date.
"""

from __future__ import annotations

import io
import json
import os
import platform
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT / "data" / "demo"
STORE = ROOT / "stores" / "demo"


def bare_mfcc_loop(paths: list[str]) -> float:
    import librosa

    t0 = time.perf_counter()
    for p in paths:
        y, _ = librosa.load(p, sr=16000, mono=True)
        librosa.feature.mfcc(y=y, sr=16000, n_mfcc=40, n_fft=400, hop_length=160, n_mels=40)
    return time.perf_counter() - t0


def _warm_worker() -> None:
    import librosa  # noqa: F401

    import pipelines.extract  # noqa: F401
    from features import create_extractor

    create_extractor("mfcc", {"n_mfcc": 40}).extract(np.zeros(1600, dtype=np.float32))


def pipeline_mfcc(workers: int | None) -> float:
    import yaml

    from pipelines.cluster import local_client, shutdown
    from pipelines.extract import load_extract_config, run_extract

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "c.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "manifest": str(DATA / "manifest.csv"),
                    "store": f"{tmp}/store",
                    "samples_per_shard": 128,
                    "groups": {"audio": {"extractor": "mfcc", "params": {"n_mfcc": 40}}},
                }
            )
        )
        config = load_extract_config(cfg)
        client = local_client(workers) if workers else None
        try:
            if client is not None:  # warm the workers' imports, as a long job amortises them
                client.run(_warm_worker)
            t0 = time.perf_counter()
            run_extract(config, client=client, progress=False)
            return time.perf_counter() - t0
        finally:
            if client is not None:
                shutdown(client)


# ---- loading: plain webdataset vs StreamingLoader vs raw reads, on the demo store's train split ----

LOADER_GROUPS = {"audio": ["audio"], "all 4": ["image", "audio", "video", "text"]}


def _wds_decode(sample: dict) -> dict:
    """What a plain-webdataset user writes: np.load every .npy member, json for the label."""
    out = {"__key__": sample["__key__"], "label": json.loads(sample["json"])["label"]}
    for k, v in sample.items():
        if k.endswith(".npy"):
            out[k[: -len(".npy")]] = np.load(io.BytesIO(v), allow_pickle=False)
    return out


def _wds_collate(samples: list[dict]) -> dict:
    """Stack fixed fields, zero-pad variable (time-first) ones, as the user would with torch."""
    import torch

    batch = {"label": torch.tensor([s["label"] for s in samples])}
    for k in samples[0]:
        if k in ("__key__", "label"):
            continue
        xs = [torch.from_numpy(s[k]) for s in samples]
        if all(x.shape == xs[0].shape for x in xs):
            batch[k] = torch.stack(xs)
        else:
            batch[k] = torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)
    return batch


def _zip_groups(groups: list[str], urls: dict[str, list[str]], batch: int):
    """One plain WebDataset pipeline per group, zipped by key (each splits shards by worker alike)."""
    import webdataset as wds

    pipes = [wds.WebDataset(urls[g], shardshuffle=False).map(_wds_decode) for g in groups]
    buf = []
    for parts in zip(*pipes, strict=True):
        key = parts[0]["__key__"]
        if any(p["__key__"] != key for p in parts):
            raise ValueError(f"key mismatch at {key}")
        merged = {"__key__": key, "label": parts[0]["label"]}
        for g, p in zip(groups, parts, strict=True):
            merged.update({f"{g}.{k}": v for k, v in p.items() if k not in ("__key__", "label")})
        buf.append(merged)
        if len(buf) == batch:
            yield _wds_collate(buf)
            buf = []
    if buf:
        yield _wds_collate(buf)


def plain_webdataset(batch: int, groups: list[str] | None = None, num_workers: int = 0) -> tuple[int, float]:
    """Plain webdataset over the train shards: one group as before, several zipped by key.

    One group: ``WebDataset(...).map(np.load + json).batched(pad)``. Several: that pipeline
    per group, zipped sample by sample (the keys checked equal). Workers: a torch DataLoader
    over the pipeline, webdataset splitting shards across workers.
    """
    import torch
    import webdataset as wds

    from pipelines.store import open_store

    store = open_store(STORE)
    groups = groups or ["audio"]
    urls = {g: [str(store.shard_path(g, s)) for s in store.shards("train")] for g in groups}
    if len(groups) == 1:
        ds = (
            wds.WebDataset(urls[groups[0]], shardshuffle=False)
            .map(_wds_decode)
            .batched(batch, collation_fn=_wds_collate)
        )
    else:
        ds = wds.DataPipeline(partial(_zip_groups, groups, urls, batch))  # an IterableDataset
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers) if num_workers else ds
    t0 = time.perf_counter()
    n = sum(len(b["label"]) for b in loader)
    return n, time.perf_counter() - t0


def modalstore_loader(
    batch: int, groups: list[str] | None = None, num_workers: int = 0, fast: bool = True
) -> tuple[int, float]:
    from fusion.loader import StreamingLoader

    loader = StreamingLoader(
        STORE, "train", groups=groups or ["audio"], batch_size=batch, num_workers=num_workers, fast=fast
    )
    t0 = time.perf_counter()
    n = sum(len(b["keys"]) for b in loader)
    return n, time.perf_counter() - t0


def first_batch_ms(batch: int, groups: list[str], num_workers: int) -> float:
    """Milliseconds from ``iter(StreamingLoader)`` to its first batch: worker start-up and first shard."""
    from fusion.loader import StreamingLoader

    loader = StreamingLoader(STORE, "train", groups=groups, batch_size=batch, num_workers=num_workers)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    dt = time.perf_counter() - t0
    it.close()  # stops the workers
    return 1e3 * dt


def raw_read(groups: list[str]) -> tuple[int, float, int]:
    """``open().read()`` of the same shard files: the I/O ceiling. (samples, seconds, bytes)."""
    from pipelines.store import open_store

    store = open_store(STORE)
    paths = [store.shard_path(g, s) for s in store.shards("train") for g in groups]
    t0 = time.perf_counter()
    nbytes = 0
    for p in paths:
        with open(p, "rb") as f:
            nbytes += len(f.read())
    return store.num_samples("train"), time.perf_counter() - t0, nbytes


def _train_samples() -> int:
    from pipelines.store import open_store

    return open_store(STORE).num_samples("train")


def _median_rate(fn, repeats: int) -> float:
    """Median samples/s over ``repeats`` runs after one warm-up run (imports, page cache)."""
    fn()
    rates = []
    for _ in range(repeats):
        n, t = fn()[:2]
        rates.append(n / t)
    return float(np.median(rates))


def loader_rows(batch: int = 64, repeats: int = 3) -> list[str]:
    """Samples/s of each loader per group set and worker count, with ratios; markdown lines."""
    lines = [
        "| groups | loader | workers | samples/s | × plain webdataset (same workers) | % of raw read |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, groups in LOADER_GROUPS.items():
        ceiling = _median_rate(partial(raw_read, groups), repeats)
        lines.append(
            f"| {label} | raw `open().read()` of the shard files (I/O ceiling) | 0 | {ceiling:,.0f} | | 100 % |"
        )
        for workers in (0, 2):
            base = _median_rate(partial(plain_webdataset, batch, groups, workers), repeats)
            runs = [
                ("plain webdataset (baseline)", base),
                (
                    "StreamingLoader, tar iteration (`fast=False`)",
                    _median_rate(partial(modalstore_loader, batch, groups, workers, False), repeats),
                ),
                (
                    "StreamingLoader, catalog offsets (default)",
                    _median_rate(partial(modalstore_loader, batch, groups, workers, True), repeats),
                ),
            ]
            for name, rate in runs:
                lines.append(
                    f"| {label} | {name} | {workers} | {rate:,.0f} | {rate / base:.2f} | {rate / ceiling:.1%} |"
                )
    first = {
        w: np.median([first_batch_ms(batch, LOADER_GROUPS["all 4"], w) for _ in range(repeats)])
        for w in (0, 2)
    }
    lines += [
        "",
        f"Train split of the demo store, batch {batch}, page cache warm, medians of {repeats} epochs after a "
        "warm-up epoch. 'all 4': image, audio, video and text joined by key; its plain-webdataset baseline "
        "zips one WebDataset pipeline per group. Every loader decodes every field (np.load / json) and "
        "pads variable fields. With workers each epoch starts fresh DataLoader worker processes: "
        f"StreamingLoader's first batch (all 4 groups) comes after {first[2]:.0f} ms with 2 workers, "
        f"{first[0]:.0f} ms with none, against an epoch of {_train_samples()} samples.",
    ]
    return lines


def _demo_groups() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "configs" / "extract_demo.yaml").read_text())["groups"]


def _warm_demo_worker(groups: dict, media: dict) -> None:
    """What the bare loop's warm-up does, on a worker: load each model and run it on one sample."""
    from features import create_extractor
    from pipelines.extract import GroupTask, _extractor
    from pipelines.media import decode

    for name, g in groups.items():
        ex = create_extractor(g["extractor"], g.get("params", {}))
        ex = _extractor(GroupTask(name, g["extractor"], ex.params(), ex.modality))
        ex.extract_batch([decode(ex.modality, media[ex.modality], ex.decode_request())])


def demo_extractors(groups: dict, sample) -> list:
    """The demo's extractors, set up and run once on ``sample`` (warm), in a process pinned to
    one thread (torch, OpenCV, BLAS) as each Dask worker is."""
    import cv2
    import torch
    from threadpoolctl import threadpool_limits

    from features import create_extractor
    from pipelines.media import decode

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    threadpool_limits(1)
    exs = [create_extractor(g["extractor"], g.get("params", {})) for g in groups.values()]
    for ex in exs:
        ex.setup()
        ex.extract_batch([decode(ex.modality, sample.media[ex.modality], ex.decode_request())])
    return exs


def demo_loop(exs: list, samples, chunk: int) -> float:
    """Seconds to decode and extract ``samples`` with ``exs``, batched as in a shard task."""
    from pipelines.media import decode

    t0 = time.perf_counter()
    for i in range(0, len(samples), chunk):
        part = samples[i : i + chunk]
        for ex in exs:
            req = ex.decode_request()
            ex.extract_batch([decode(ex.modality, s.media[ex.modality], req) for s in part])
    return time.perf_counter() - t0


# Parameters for the per-extractor table: the demo's settings where the defaults target
# full-size media (a 224 px ViT on CPU is a different benchmark).
EXTRACTOR_PARAMS = {
    "cnn": {"image_size": 64, "device": "cpu"},
    "frame_cnn": {"image_size": 64, "num_frames": 8, "device": "cpu"},
    "clip": {"image_size": 64, "clip_len": 8, "device": "cpu"},
    "sentence": {"device": "cpu"},
    "sift": {"codebook_size": 16, "size": 128},
    "flow": {"size": 64},
}


def extractor_throughput(n: int = 48) -> list[tuple[str, str, float]]:
    """Samples/s of every registered extractor on one core, demo media, decode excluded."""
    import torch

    from features import create_extractor, get_extractor, list_extractors
    from pipelines.manifest import read_manifest
    from pipelines.media import decode

    torch.set_num_threads(1)
    samples = read_manifest(DATA / "manifest.csv").samples[:n]
    rows = []
    for name in list_extractors():
        ex = create_extractor(name, EXTRACTOR_PARAMS.get(name, {}))
        request = ex.decode_request()
        medias = [decode(ex.modality, s.media[ex.modality], request) for s in samples]
        ex.setup()
        if get_extractor(name).fit_required:
            ex.fit(medias)
        ex.extract_batch(medias[:4])  # warm-up
        t0 = time.perf_counter()
        ex.extract_batch(medias)
        rows.append((name, ex.modality, n / (time.perf_counter() - t0)))
    return rows


def main() -> int:
    if not (DATA / "manifest.csv").exists() or not (STORE / "store.json").exists():
        print("run `make features` first (demo data and store)", file=sys.stderr)
        return 2
    from pipelines.manifest import read_manifest

    paths = [s.media["audio"] for s in read_manifest(DATA / "manifest.csv").samples]
    n = len(paths)
    rows = []
    bare_mfcc_loop(paths[:100])  # warm: imports, page cache
    bare = bare_mfcc_loop(paths)
    rows.append(("MFCC-40: bare librosa loop, 1 process (baseline)", n / bare, 1.0))
    serial = pipeline_mfcc(None)
    rows.append(("MFCC-40: `modalstore extract --serial`, end to end", n / serial, bare / serial))
    cores = min(2, os.cpu_count() or 1)
    dask = pipeline_mfcc(cores)
    rows.append((f"MFCC-40: `modalstore extract`, Dask {cores} workers, end to end", n / dask, bare / dask))

    lines = [
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"date {time.strftime('%Y-%m-%d')}; {n} demo samples",
        "",
        "| what | items/s | × baseline |",
        "| --- | --- | --- |",
        *[f"| {name} | {rate:,.0f} | {ratio:.2f} |" for name, rate, ratio in rows],
        "",
        f"Dask parallel efficiency vs the serial pipeline: {serial / dask / cores:.0%} of ideal on {cores} workers.",
    ]
    lines += ["", "Loading the demo store:", "", *loader_rows()]
    lines += [
        "",
        "Per extractor, one core, demo media (decoding excluded):",
        "",
        "| extractor | modality | samples/s/core |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {name} | {mod} | {rate:,.1f} |" for name, mod, rate in extractor_throughput()]
    out = "\n".join(lines)
    (ROOT / ".bench").mkdir(exist_ok=True)
    (ROOT / ".bench" / "results.md").write_text(out + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
