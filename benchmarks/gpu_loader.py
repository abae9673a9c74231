"""GPU loader check: StreamingLoader -> CUDA while a late-fusion model trains on the stream.

Measures samples/s and the fraction of step time spent waiting for data, checks that
batches arrive on the GPU equal to the CPU loader's, and trains + evaluates the demo
models on CUDA. Skips (exit 0) without CUDA.

    python benchmarks/gpu_loader.py --store stores/demo --out gpu.json
    python benchmarks/gpu_loader.py --synthetic 20000 --batch-size 256   # the loader issue's layout

``--synthetic N`` writes the loader issue's layout (4 groups, float16, N samples, train split
only; `benchmarks/synthetic_store.py`) to a temporary folder and uses it instead of a store.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="stores/demo")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--synthetic", type=int, default=0, metavar="N", help="use N samples of the issue layout")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a dry run of this script
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("skipped: CUDA is not available")
        return 0
    if args.synthetic:
        import tempfile

        from synthetic_store import ISSUE_SPEC, write_store

        with tempfile.TemporaryDirectory() as tmp:
            args.store = str(write_store(Path(tmp) / "issue", ISSUE_SPEC, args.synthetic, 1000))
            return run(args)
    return run(args)


def run(args) -> int:
    from fusion.loader import StreamingLoader
    from fusion.models import create_model

    dev = torch.device(args.device)
    result: dict = {
        "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else "none (dry run)",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }

    # 1. batches on the GPU equal the CPU loader's
    split = "train" if args.synthetic else "val"
    cpu = next(iter(StreamingLoader(args.store, split, batch_size=args.batch_size)))
    gpu = next(iter(StreamingLoader(args.store, split, batch_size=args.batch_size, device=dev)))
    same = all(torch.equal(cpu["features"][k], gpu["features"][k].cpu()) for k in cpu["features"])
    on_gpu = all(t.is_cuda for t in gpu["features"].values()) and gpu["label"].is_cuda
    result["batches_equal_cpu"] = bool(same and torch.equal(cpu["label"], gpu["label"].cpu()))
    result["batches_on_gpu"] = bool(on_gpu)

    # 2. throughput and data-wait fraction while training on the stream
    loader = StreamingLoader(
        args.store,
        "train",
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.num_workers,
        device=dev,
    )
    torch.manual_seed(0)
    model = create_model(
        "late_fusion", loader.field_specs, loader.field_groups, loader.groups, loader.num_classes
    ).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    wait = step = 0.0
    samples = 0
    t_all = time.perf_counter()
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            t1 = time.perf_counter()
            if batch is None:
                break
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(batch)["logits"].float(), batch["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            if epoch > 0:  # epoch 0 warms up workers and kernels
                wait += t1 - t0
                step += t2 - t1
                samples += len(batch["keys"])
    result["train_samples_per_s"] = samples / max(wait + step, 1e-9)
    result["data_wait_fraction"] = wait / max(wait + step, 1e-9)
    result["wall_s"] = time.perf_counter() - t_all
    result["final_loss"] = float(loss.detach())
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if result["batches_equal_cpu"] and result["batches_on_gpu"] else 1


if __name__ == "__main__":
    sys.exit(main())
