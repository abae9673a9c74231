"""StreamingLoader on CUDA: batches equal to the CPU path's, bit for bit, with 0 and 2 workers
(pinned memory, one shared-memory segment per worker batch, persistent workers, a resume),
then loader -> GPU throughput on the loader issue's layout. Needs CUDA; exits 0 with a message
without it.

    python benchmarks/loader_cuda_check.py [--samples 20000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

try:
    importlib.import_module("features")
except ImportError as e:  # a GPU box without the extractors' media libraries: the loader needs none
    print(f"(features' extractors not importable: {e}; loading features.errors/spec only)")
    pkg = types.ModuleType("features")
    pkg.__path__ = [str(ROOT / "features")]
    sys.modules["features"] = pkg


def same(a: dict, b: dict) -> bool:
    if a["keys"] != b["keys"] or not a["label"].cpu().equal(b["label"]):
        return False
    for part in ("features", "lengths", "mask", "present"):
        if a[part].keys() != b[part].keys():
            return False
        for k in a[part]:
            x, y = a[part][k].cpu(), b[part][k].cpu()
            if x.dtype != y.dtype or x.shape != y.shape or x.numpy().tobytes() != y.numpy().tobytes():
                return False
    return True


def main() -> int:
    import torch
    from synthetic_store import ISSUE_SPEC, write_store

    from features.spec import FieldSpec
    from fusion.loader import StreamingLoader

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA: nothing to check")
        return 0
    print(torch.cuda.get_device_name(0), torch.__version__)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        small = {"a": {"vec": FieldSpec("float16", (6,)), "seq": FieldSpec("float32", (None, 3))}}
        root = write_store(Path(tmp) / "small", small, 300, 64, lengths={"a.seq": lambda i, rng: 1 + i % 17})
        kw = dict(batch_size=32, shuffle=True, seed=5, buffer_size=64)
        ok = True
        for workers in (0, 2):
            cpu = StreamingLoader(root, "train", **kw)
            gpu = StreamingLoader(root, "train", device="cuda", num_workers=workers, **kw)
            for epoch in (0, 1):
                cpu.set_epoch(epoch)
                gpu.set_epoch(epoch)
                want, got = list(cpu), list(gpu)
                good = len(want) == len(got) and all(same(a, b) for a, b in zip(got, want, strict=True))
                on_gpu = all(t.is_cuda for b in got for t in b["features"].values())
                print(f"workers {workers}, epoch {epoch}: equal to the CPU path {good}, on cuda {on_gpu}")
                ok &= good and on_gpu
            it = iter(gpu)
            head = [next(it) for _ in range(3)]
            state = gpu.state_dict()
            del it
            gpu.load_state_dict(state)
            good = all(same(a, b) for a, b in zip(head + list(gpu), want, strict=True))
            print(f"workers {workers}: resume after 3 batches equal {good}")
            ok &= good
        store = write_store(Path(tmp) / "issue", ISSUE_SPEC, args.samples, 1000)
        for workers in (0, 2, 4):
            loader = StreamingLoader(store, "train", batch_size=256, device="cuda", num_workers=workers)
            rates = []
            for epoch in range(4):
                loader.set_epoch(epoch)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                n = 0
                for b in loader:
                    n += len(b["keys"])
                    b["features"]["audio.mfcc"].sum()  # use the batch on the device
                torch.cuda.synchronize()
                rates.append(n / (time.perf_counter() - t0))
            print(
                f"issue layout -> cuda, {workers} workers: "
                + ", ".join(f"{r:,.0f}" for r in rates)
                + " samples/s"
            )
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
