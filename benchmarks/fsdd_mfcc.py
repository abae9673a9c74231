"""MFCC-40 at 16 kHz of the 3,000 FSDD recordings, end to end, against lhotse.

Both write a feature store: modalstore `extract` on a 2-worker Dask LocalCluster (WebDataset
shards + catalog) and lhotse `CutSet.compute_and_store_features(Mfcc, num_jobs=2)` (lilcom
chunks + cut manifest), from the same WAV files resampled from 8 kHz, in the same process,
alternating A B A B. Skips when ../shared/data/fsdd is absent; needs `pip install lhotse`
(the `bench` extra).
"""

from __future__ import annotations

import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FSDD = ROOT.parent / "shared" / "data" / "fsdd" / "recordings"


def write_manifest(folder: Path) -> Path:
    paths = sorted(FSDD.glob("*.wav"))
    manifest = folder / "fsdd.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "label", "split", "audio"])
        for p in paths:
            digit, speaker, index = p.stem.split("_")
            w.writerow([p.stem, int(digit), "test" if int(index) < 5 else "train", str(p)])
    return manifest


def run_modalstore(manifest: Path, out: Path, client) -> float:
    import yaml

    from pipelines.extract import load_extract_config, run_extract

    cfg = out.with_suffix(".yaml")
    cfg.write_text(
        yaml.safe_dump(
            {
                "manifest": str(manifest),
                "store": str(out),
                "samples_per_shard": 250,
                "groups": {"audio": {"extractor": "mfcc", "params": {"sample_rate": 16000, "n_mfcc": 40}}},
            }
        )
    )
    t0 = time.perf_counter()
    run_extract(load_extract_config(cfg), client=client, progress=False)
    return time.perf_counter() - t0


def run_lhotse(out: Path) -> float:
    from lhotse import CutSet, Mfcc, MfccConfig, Recording, RecordingSet

    t0 = time.perf_counter()
    recordings = RecordingSet.from_recordings(Recording.from_file(p) for p in sorted(FSDD.glob("*.wav")))
    cuts = CutSet.from_manifests(recordings=recordings).resample(16000)
    cuts = cuts.compute_and_store_features(
        extractor=Mfcc(MfccConfig(sampling_rate=16000, num_ceps=40, num_filters=40)),
        storage_path=str(out),
        num_jobs=2,
    )
    cuts.to_file(str(out) + ".jsonl.gz")
    return time.perf_counter() - t0


def main() -> int:
    if not FSDD.exists():
        print(f"skipped: FSDD not found at {FSDD}")
        return 0
    try:
        import lhotse  # noqa: F401
    except ImportError:
        print("skipped: lhotse is not installed (pip install 'modalstore[bench]')")
        return 0
    from pipelines.cluster import local_client, shutdown

    n = len(list(FSDD.glob("*.wav")))
    client = local_client(2)
    client.run(lambda: __import__("pipelines.extract") and __import__("librosa") and None)
    ours, theirs = [], []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            manifest = write_manifest(tmp)
            run_modalstore(manifest, tmp / "warm", client)  # warm workers and page cache
            for i in range(2):
                theirs.append(run_lhotse(tmp / f"lhotse{i}"))
                ours.append(run_modalstore(manifest, tmp / f"ms{i}", client))
    finally:
        shutdown(client)
    a, b = statistics.median(ours), statistics.median(theirs)
    lines = [
        f"FSDD MFCC-40 @16 kHz, {n} files, 2 worker processes, end to end with store writing "
        f"({time.strftime('%Y-%m-%d')}):",
        "",
        "| pipeline | files/s (median of 2) | runs (s) |",
        "| --- | --- | --- |",
        f"| modalstore extract (Dask LocalCluster, 2 workers) | {n / a:,.0f} | {', '.join(f'{t:.1f}' for t in ours)} |",
        f"| lhotse compute_and_store_features(Mfcc, num_jobs=2) | {n / b:,.0f} | {', '.join(f'{t:.1f}' for t in theirs)} |",
        "",
        f"modalstore / lhotse throughput: {b / a:.2f}x (target >= 1.2x)",
    ]
    out = "\n".join(lines)
    (ROOT / ".bench").mkdir(exist_ok=True)
    (ROOT / ".bench" / "fsdd_mfcc.md").write_text(out + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
