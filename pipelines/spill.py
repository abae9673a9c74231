"""Rows kept on local disk instead of in the driver's memory: spills and external sorts.

The ``extract`` driver plans and catalogs millions of samples; what it must hold for each
of them goes to anonymous temporary Arrow IPC files in ``$TMPDIR`` (unlinked at once, so
nothing is left behind however the process ends) and is read back a shard or a batch at a time:

- ``Spill``: rows appended in order, read back by range or by position (the manifest's rows);
- ``ExternalSort``: rows sorted by columns in bounded memory (runs sorted in memory, spilled,
  then merged batch by batch): duplicate keys and the catalog's key index.

What the driver still holds per sample is the footers of these files (24 bytes per batch of
~1,000 rows) and its CPU time; BENCHMARKS.md, "Driver memory", has the measurements.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np


def release_arrow_memory() -> None:
    """Hand memory Arrow's allocator keeps after a large transient back to the OS: mimalloc
    holds freed pages, so one sort of 1M keys left the driver's RSS 34 MB higher for the rest
    of the run (BENCHMARKS.md, "Driver memory")."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


@contextmanager
def system_memory_pool():
    """Arrow's allocations inside the block on the C library's allocator (then the default pool
    again). Arrow's default, mimalloc, kept the pages of buffers that Arrow's reader threads
    allocated and the caller freed, beyond ``release_unused``: reading a 300k-row spill (then a
    Parquet file) back raised the RSS by 12 MB with nothing allocated; on the system allocator,
    by 1 MB (BENCHMARKS.md, "Driver memory"). The ``extract`` driver runs inside it."""
    import pyarrow as pa

    before = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        release_arrow_memory()
        pa.set_memory_pool(before)


def _temporary(prefix: str):
    # anonymous (unlinked at once): nothing is left behind, even by a killed process
    return tempfile.TemporaryFile(prefix=prefix, suffix=".arrow")


class _BatchFile:
    """Record batches appended to an anonymous temporary Arrow IPC file, read back by number.

    IPC, not Parquet: a spill is read back once, soon, so it needs no encoding, and the file's
    footer keeps 24 bytes per batch where a Parquet writer kept ~5 KB of metadata per row group
    in memory (5 MB at 1M rows in groups of 1,024, growing with the rows)."""

    def __init__(self, schema, prefix: str) -> None:
        import pyarrow as pa

        self.schema = schema
        self.file = _temporary(prefix)
        self._writer = pa.ipc.new_file(self.file, schema)
        self._reader = None
        self.batches = 0

    def write(self, table) -> int:
        """Append ``table`` (one or more rows) as one batch; returns its number."""
        if table.num_rows == 0:
            raise ValueError("an empty batch")
        (batch,) = table.combine_chunks().to_batches()
        self._writer.write_batch(batch)
        self.batches += 1
        return self.batches - 1

    def finish(self) -> None:
        import pyarrow as pa

        if self._reader is None:
            self._writer.close()
            self._reader = pa.ipc.open_file(self.file)

    def read(self, numbers, columns: list[str] | None = None):
        """Batches ``numbers`` (in that order) as one table."""
        import pyarrow as pa

        table = pa.Table.from_batches([self._reader.get_batch(int(i)) for i in numbers], schema=self.schema)
        return table.select(columns) if columns else table

    def close(self) -> None:
        if self._reader is None:
            self._writer.close()
        self.file.close()


def _write_batches(file: _BatchFile, tables: list, rows: int, last: bool) -> tuple[list[int], list]:
    """Write ``tables`` as batches of ``rows`` rows (and, when ``last``, a shorter final one):
    returns (the batch numbers written, the rows left as a list of tables)."""
    import pyarrow as pa

    if not tables:
        return [], []
    table = pa.concat_tables(tables)
    written = []
    whole = table.num_rows if last else table.num_rows // rows * rows
    for start in range(0, whole, rows):
        written.append(file.write(table.slice(start, min(rows, whole - start))))
    return written, ([table.slice(whole)] if whole < table.num_rows else [])


class Spill:
    """Rows of ``schema`` appended in order to an anonymous temporary file in batches of
    exactly ``group_rows`` rows, so that the rows of any range or positions are read back from
    the batches that hold them and nothing else."""

    def __init__(self, schema, group_rows: int, prefix: str = "modalstore-spill-") -> None:
        self.schema, self.group_rows, self.prefix = schema, group_rows, prefix
        self._file = _BatchFile(schema, prefix)
        self._pending: list = []
        self._pending_rows = 0
        self._closed = False
        self.rows = 0

    def __len__(self) -> int:
        return self.rows

    def append(self, table) -> None:
        """Append an Arrow table of ``schema``'s columns (before ``close``)."""
        if self._closed:
            raise RuntimeError(f"{self.prefix} spill: append after close")
        self._pending.append(table.select(self.schema.names).cast(self.schema))
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        if self._pending_rows >= self.group_rows:
            self._pending = _write_batches(self._file, self._pending, self.group_rows, last=False)[1]
            self._pending_rows = sum(t.num_rows for t in self._pending)

    def close(self) -> None:
        """Finish writing; the rows can be read from now on."""
        if self._closed:
            return
        _write_batches(self._file, self._pending, self.group_rows, last=True)
        self._pending = []
        self._file.finish()
        self._closed = True

    def _groups(self, groups, columns):
        if not self._closed:
            raise RuntimeError(f"{self.prefix} spill: read before close")
        return self._file.read(groups, columns)

    def read(self, start: int, stop: int, columns: list[str] | None = None):
        """Rows ``start:stop`` as an Arrow table."""
        stop = min(stop, self.rows)
        if stop <= start:
            return self.schema.empty_table().select(columns or self.schema.names)
        first, last = start // self.group_rows, (stop - 1) // self.group_rows
        table = self._groups(range(first, last + 1), columns)
        return table.slice(start - first * self.group_rows, stop - start)

    def take(self, positions: np.ndarray, columns: list[str] | None = None):
        """The rows at ``positions`` (in that order) as an Arrow table. Batches are read
        ``TAKE_BATCHES`` at a time: spread-out positions (an evenly spaced subset) must not read
        the whole file into memory at once."""
        import pyarrow as pa

        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) == 0:
            return self.schema.empty_table().select(columns or self.schema.names)
        batch_of = positions // self.group_rows
        batches = np.unique(batch_of)
        picked, tables = [], []
        for i in range(0, len(batches), TAKE_BATCHES):
            group = batches[i : i + TAKE_BATCHES]
            sel = np.flatnonzero(np.isin(batch_of, group))  # the positions in these batches
            starts = np.searchsorted(group, batch_of[sel]) * self.group_rows
            table = self._groups(group.tolist(), columns)
            tables.append(table.take(pa.array(starts + positions[sel] % self.group_rows)))
            picked.append(sel)
        order = np.empty(len(positions), np.int64)  # where each position's row landed
        order[np.concatenate(picked)] = np.arange(len(positions))
        table = pa.concat_tables(tables)
        return table if np.array_equal(order, np.arange(len(order))) else table.take(pa.array(order))


TAKE_BATCHES = 16  # batches of a spill read at once by ``Spill.take``


class ExternalSort:
    """Rows of ``schema`` sorted by the columns ``by`` in bounded memory.

    Every ``run_rows`` appended rows are sorted and written as batches of ``batch_rows`` to one
    anonymous temporary file (one file, whatever the number of runs: no limit on open files);
    ``merged`` merges the runs a batch of each at a time, ``fan_in`` runs at most at once
    (runs past that are first merged ``fan_in`` at a time into a new file). Memory holds one
    run, or ``fan_in`` batches while merging: 1M rows are 62 runs of 16,384, merged 16 at a
    time into 4, then into one.
    """

    def __init__(
        self, schema, by: list[str], run_rows: int, batch_rows: int, prefix: str, fan_in: int = 16
    ) -> None:
        self.schema, self.by, self.run_rows, self.batch_rows = schema, list(by), run_rows, batch_rows
        self.fan_in = max(2, fan_in)
        self.prefix = prefix
        self._sort_keys = [(c, "ascending") for c in self.by]
        self.pending: list = []
        self.count = 0
        self.runs: list[list[int]] = []  # each run's batch numbers in its file
        self._file: _BatchFile | None = None

    def add(self, table) -> None:
        self.pending.append(table.select(self.schema.names).cast(self.schema))
        self.count += table.num_rows
        if self.count >= self.run_rows:
            self._spill()

    def _sorted_pending(self):
        import pyarrow as pa

        table = pa.concat_tables(self.pending) if self.pending else self.schema.empty_table()
        self.pending, self.count = [], 0
        return table.sort_by(self._sort_keys)

    def _spill(self) -> None:
        if self._file is None:
            self._file = _BatchFile(self.schema, self.prefix)
        table = self._sorted_pending()
        self.runs.append(_write_batches(self._file, [table], self.batch_rows, last=True)[0])
        del table
        release_arrow_memory()  # the sort's transient

    def merged(self) -> Iterator:
        """The rows in sorted order, as tables of at most ``fan_in`` batches."""
        if not self.runs:
            yield self._sorted_pending()
            return
        if self.count:
            self._spill()
        self._file.finish()
        while len(self.runs) > self.fan_in:
            out, runs = _BatchFile(self.schema, self.prefix), []
            for i in range(0, len(self.runs), self.fan_in):
                numbers, pending = [], []
                for table in self._merge(self.runs[i : i + self.fan_in]):
                    pending.append(table)
                    if sum(t.num_rows for t in pending) >= self.batch_rows:
                        done, pending = _write_batches(out, pending, self.batch_rows, last=False)
                        numbers += done
                numbers += _write_batches(out, pending, self.batch_rows, last=True)[0]
                runs.append(numbers)
            out.finish()
            self._file.close()
            self._file, self.runs = out, runs
        yield from self._merge(self.runs)

    def _merge(self, runs: list[list[int]]) -> Iterator:
        """Merge the sorted runs made of the batches ``runs`` of the file."""
        import pyarrow as pa

        readers = [(self._file.read([n]) for n in numbers) for numbers in runs]
        heads: list = [next(r) for r in readers]
        live = list(range(len(readers)))  # runs with rows left in their head or their file
        while live:
            # every row up to the smallest last row among the heads is final: no run can still
            # hold a smaller one
            bound = min(self._last(heads[i]) for i in live)
            taken = []
            for i in live:
                n = self._count_upto(heads[i], bound)
                taken.append(heads[i].slice(0, n))
                heads[i] = heads[i].slice(n)
            yield pa.concat_tables(taken).sort_by(self._sort_keys)
            for i in list(live):
                if heads[i].num_rows == 0:
                    nxt = next(readers[i], None)
                    if nxt is None:
                        live.remove(i)
                    else:
                        heads[i] = nxt

    def _last(self, table) -> tuple:
        return tuple(table.column(c)[-1].as_py() for c in self.by)

    def _count_upto(self, table, bound: tuple) -> int:
        """How many leading rows of a sorted ``table`` sort at or before ``bound``."""
        import pyarrow.compute as pc

        first = table.column(self.by[0])
        n = pc.sum(pc.less(first, bound[0])).as_py() or 0
        equal = pc.sum(pc.equal(first, bound[0])).as_py() or 0
        if len(self.by) == 1 or not equal:
            return n + equal
        tie = table.slice(n, equal)  # rows whose first column equals the bound's: by the rest
        return n + sum(
            1 for row in zip(*(tie.column(c).to_pylist() for c in self.by), strict=True) if row <= bound
        )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
        self.runs = []

    def __enter__(self) -> ExternalSort:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
