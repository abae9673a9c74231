"""Benchmarks, run by `make bench`: ratios against baselines measured in the same process.

1. MFCC extraction of the demo audio: a bare single-process librosa loop (baseline) vs
   `modalstore extract` serially and on a 2-worker Dask LocalCluster, end to end
   including decoding and writing the store.
2. Loading the demo store's train split to batched tensors: plain `webdataset`
   (`WebDataset(...).to_tuple(...).batched(...)` with np.load decoding) vs StreamingLoader.

Figures are printed as a markdown table and written to .bench/results.md; copy them into
BENCHMARKS.md with the machine and date.
"""

from __future__ import annotations

import io
import os
import platform
import sys
import tempfile
import time
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

    from pipelines.cluster import local_client
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
                cluster = client.cluster
                client.close()
                cluster.close()


def plain_webdataset(batch: int) -> tuple[int, float]:
    import json

    import torch
    import webdataset as wds

    from pipelines.store import open_store

    store = open_store(STORE)
    urls = [str(store.shard_path("audio", s)) for s in store.shards("train")]
    ds = (
        wds.WebDataset(urls, shardshuffle=False)
        .map(lambda s: (np.load(io.BytesIO(s["mfcc.npy"])), json.loads(s["json"])["label"]))
        .batched(
            batch,
            collation_fn=lambda xs: (
                torch.nn.utils.rnn.pad_sequence([torch.from_numpy(x) for x, _ in xs], batch_first=True),
                torch.tensor([y for _, y in xs]),
            ),
        )
    )
    t0 = time.perf_counter()
    n = sum(len(y) for _, y in ds)
    return n, time.perf_counter() - t0


def modalstore_loader(batch: int) -> tuple[int, float]:
    from fusion.loader import StreamingLoader

    loader = StreamingLoader(STORE, "train", groups=["audio"], batch_size=batch)
    t0 = time.perf_counter()
    n = sum(len(b["keys"]) for b in loader)
    return n, time.perf_counter() - t0


def _demo_groups() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "configs" / "extract_demo.yaml").read_text())["groups"]


def _warm_demo_worker(groups: dict) -> None:
    from features import create_extractor
    from pipelines.extract import GroupTask, _extractor
    from pipelines.media import decode  # noqa: F401

    for name, g in groups.items():
        ex = create_extractor(g["extractor"], g.get("params", {}))
        _extractor(GroupTask(name, g["extractor"], ex.params(), ex.modality))


def bare_demo_loop(samples, groups: dict, chunk: int) -> float:
    """The demo's four extractors over the samples in one process, batched as in a shard task.

    One core, as each Dask worker gets: torch, OpenCV and BLAS pinned to one thread.
    """
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
        ex.extract_batch([decode(ex.modality, samples[0].media[ex.modality], ex.decode_request())])  # warm
    t0 = time.perf_counter()
    for i in range(0, len(samples), chunk):
        part = samples[i : i + chunk]
        for ex in exs:
            req = ex.decode_request()
            ex.extract_batch([decode(ex.modality, s.media[ex.modality], req) for s in part])
    return time.perf_counter() - t0


def pipeline_demo(manifest: Path, groups: dict, chunk: int, workers: int) -> float:
    import yaml

    from pipelines.cluster import local_client
    from pipelines.extract import load_extract_config, run_extract

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "c.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "manifest": str(manifest),
                    "store": f"{tmp}/store",
                    "samples_per_shard": chunk,
                    "groups": groups,
                }
            )
        )
        config = load_extract_config(cfg)
        client = local_client(workers)
        try:
            client.run(_warm_demo_worker, groups)
            t0 = time.perf_counter()
            run_extract(config, client=client, progress=False)
            return time.perf_counter() - t0
        finally:
            cluster = client.cluster
            client.close()
            cluster.close()


def demo_overhead(n: int = 768, chunk: int = 32) -> list[str]:
    """Dask pipeline vs a bare loop over the demo's extractors, per core."""
    import csv

    from pipelines.manifest import read_manifest

    groups = _demo_groups()
    samples = read_manifest(DATA / "manifest.csv").samples[:n]
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "m.csv"
        with open(manifest, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["key", "label", "split", "image", "audio", "video", "text"])
            for s in samples:
                w.writerow(
                    [s.key, s.label, s.split, *(s.media[m] for m in ("image", "audio", "video", "text"))]
                )
        bare = bare_demo_loop(samples, groups, chunk)
        cores = min(2, os.cpu_count() or 1)
        dask = pipeline_demo(manifest, groups, chunk, cores)
    overhead = (bare / cores) / dask
    return [
        f"| demo config (cnn + mfcc + flow + sentence): bare loop, 1 process (baseline) | {n / bare:,.1f} | 1.00 |",
        f"| demo config: `modalstore extract`, Dask {cores} workers, end to end | {n / dask:,.1f} | {bare / dask:.2f} |",
        "",
        f"Demo config: {n} samples in shards of {chunk}; per-core efficiency of the Dask pipeline vs the bare "
        f"loop: {overhead:.0%} (overhead {1 / overhead - 1:+.0%} per core).",
    ]


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
    m, t = plain_webdataset(64)
    rows.append(("load audio group: plain webdataset, batch 64 (baseline)", m / t, 1.0))
    m2, t2 = modalstore_loader(64)
    rows.append(("load audio group: StreamingLoader, batch 64", m2 / t2, (m2 / t2) / (m / t)))

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
    lines += ["", "| what | samples/s | × baseline |", "| --- | --- | --- |", *demo_overhead()]
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
