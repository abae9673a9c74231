"""Mid-epoch resume cost: index arithmetic on a synthetic 1M- (and 10M-) sample epoch plan,
and ``load_state_dict`` + first batch on the demo store against a fresh epoch's first batch.

The plan part builds what a resumed worker builds (``EpochOrder`` from shard sizes, seed
and epoch; ``EpochPlan`` from the saved position) and locates its first batch's samples;
no store is needed for that, as nothing before the position is read.

    python benchmarks/loader_resume.py [--store stores/demo]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusion.epochs import EpochOrder, EpochPlan  # noqa: E402
from fusion.loader import StreamingLoader  # noqa: E402


def resume_plan(sizes: np.ndarray, position: int, world: int, batch: int) -> float:
    """Seconds to rebuild one rank's plan at ``position`` and locate its first batch."""
    t0 = time.perf_counter()
    order = EpochOrder(sizes, shuffle=True, seed=0, epoch=7, window=4096)
    plan = EpochPlan(order, position, rank=world - 1, world=world, batch_size=batch, drop_last=False)
    ks, idx = order.locate(plan.positions(0))
    shards = order.shard_order[ks]
    assert plan.num_batches > 0 and (idx < sizes[shards]).all()
    return time.perf_counter() - t0


def first_batch_s(store: str, state: dict | None) -> float:
    loader = StreamingLoader(store, "train", batch_size=64, shuffle=True, seed=0)
    t0 = time.perf_counter()
    if state is not None:
        loader.load_state_dict(state)
    next(iter(loader))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="stores/demo")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print("| epoch samples | shards | world | resume at the midpoint (ms, median of 5) |")
    print("| --- | --- | --- | --- |")
    for n, per_shard in ((1_000_000, 250), (10_000_000, 250)):
        sizes = rng.integers(per_shard // 2, per_shard * 3 // 2, size=n // per_shard)
        sizes[-1] += n - sizes.sum()  # exactly n samples, shards of uneven sizes
        for world in (1, 8):
            times = [resume_plan(sizes, n // 2, world, 256) for _ in range(5)]
            print(f"| {n:,} | {len(sizes):,} | {world} | {1e3 * statistics.median(times):.2f} |")
    if Path(args.store, "store.json").exists():
        half = StreamingLoader(args.store, "train", batch_size=64, shuffle=True, seed=0)
        state = {**half.state_dict(), "position": half.num_samples // 2}
        fresh = statistics.median(first_batch_s(args.store, None) for _ in range(5))
        resumed = statistics.median(first_batch_s(args.store, state) for _ in range(5))
        print(
            f"\n{args.store} train: first batch of a fresh epoch {1e3 * fresh:.1f} ms, "
            f"after load_state_dict at the midpoint {1e3 * resumed:.1f} ms (medians of 5)"
        )


if __name__ == "__main__":
    main()
