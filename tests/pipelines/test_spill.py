"""Spills and external sorts (pipelines/spill.py), against plain in-memory computations."""

import random

import numpy as np
import pyarrow as pa
import pytest

import pipelines.spill as spill
from pipelines.spill import ExternalSort, Spill


def _spill(n: int, group_rows: int) -> Spill:
    schema = pa.schema([("a", pa.int64()), ("b", pa.string())])
    s = Spill(schema, group_rows, "test-")
    for i in range(0, n, 33):  # appends that do not line up with the batches
        m = min(33, n - i)
        s.append(pa.table({"a": np.arange(i, i + m), "b": [f"v{x}" for x in range(i, i + m)]}))
    s.close()
    return s


@pytest.mark.parametrize("take_batches", [1, 2, 16, 1000])
def test_spill_reads_ranges_and_positions_like_a_list(monkeypatch, take_batches):
    """Ranges and positions (random order, repeats, spread over every batch) read back the rows
    a list would give, however many batches ``take`` reads at once."""
    monkeypatch.setattr(spill, "TAKE_BATCHES", take_batches)
    n = 500
    s = _spill(n, 7)
    assert len(s) == n
    rng = np.random.default_rng(take_batches)
    for _ in range(20):
        start = int(rng.integers(0, n))
        stop = int(rng.integers(start, n + 20))
        assert s.read(start, stop).column("a").to_pylist() == list(range(start, min(stop, n)))
        pos = rng.integers(0, n, int(rng.integers(1, 300)))
        got = s.take(pos)
        assert got.column("a").to_pylist() == pos.tolist()
        assert got.column("b").to_pylist() == [f"v{x}" for x in pos]
    assert s.take(np.arange(3, 450, 9), ["b"]).column_names == ["b"]
    assert s.read(10, 10).num_rows == 0 and s.take([]).num_rows == 0


def test_spill_refuses_reads_before_close_and_appends_after():
    schema = pa.schema([("a", pa.int64())])
    s = Spill(schema, 4, "test-")
    s.append(pa.table({"a": [1, 2, 3, 4, 5]}))
    with pytest.raises(RuntimeError, match="read before close"):
        s.read(0, 2)
    s.close()
    with pytest.raises(RuntimeError, match="append after close"):
        s.append(pa.table({"a": [6]}))
    assert s.read(0, 5).column("a").to_pylist() == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("fan_in", [2, 16, 100])
def test_external_sort_merges_runs_like_a_sort(fan_in):
    """``ExternalSort`` on two columns, with ties in the first, runs of 11 rows and batches of 4,
    gives the rows of a plain sort: merged at once (fan-in 100), after one pass of merging 16
    runs at a time into fewer (16), or after several passes (2)."""
    rng = random.Random(1)
    rows = [(rng.choice("abcdefg") * rng.randrange(1, 3), rng.randrange(20)) for _ in range(300)]
    schema = pa.schema([("key", pa.string()), ("n", pa.int64())])
    with ExternalSort(schema, ["key", "n"], 11, 4, "test-", fan_in=fan_in) as sort:
        for i in range(0, len(rows), 13):
            part = rows[i : i + 13]
            sort.add(pa.table({"key": [r[0] for r in part], "n": [r[1] for r in part]}, schema=schema))
        got = [
            (k, n)
            for t in sort.merged()
            for k, n in zip(*(t.column(c).to_pylist() for c in ("key", "n")), strict=True)
        ]
    assert len(sort.runs) == 0  # closed
    assert got == sorted(rows)
