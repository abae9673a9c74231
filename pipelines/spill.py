"""Rows kept on local disk instead of in the driver's memory: spills and external sorts.

The ``extract`` driver plans and catalogs millions of samples; what it must hold for each
of them goes to anonymous temporary Parquet files (unlinked at once, so nothing is left
behind however the process ends) and is read back a shard or a batch at a time:

- ``Spill``: rows appended in order, read back by range or by position (the manifest's rows);
- ``ExternalSort``: rows sorted by a column in bounded memory (runs sorted in memory, spilled,
  then merged batch by batch): duplicate keys and the catalog's key index.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import numpy as np


def release_arrow_memory() -> None:
    """Hand memory Arrow's allocator keeps after a large transient back to the OS: mimalloc
    holds freed pages, so one sort of 1M keys left the driver's RSS 34 MB higher for the rest
    of the run (BENCHMARKS.md, "Driver memory")."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def _temporary(prefix: str):
    # anonymous (unlinked at once): nothing is left behind, even by a killed process
    return tempfile.TemporaryFile(prefix=prefix, suffix=".parquet")


class Spill:
    """Rows of ``schema`` appended in order to an anonymous temporary Parquet file, in row
    groups of exactly ``group_rows`` rows, so that the rows of any range or positions are read
    back from the row groups that hold them and nothing else."""

    def __init__(self, schema, group_rows: int, prefix: str = "modalstore-spill-") -> None:
        self.schema, self.group_rows, self.prefix = schema, group_rows, prefix
        self._file = _temporary(prefix)
        self._writer = None
        self._pending: list = []
        self._pending_rows = 0
        self._reader = None
        self.rows = 0

    def __len__(self) -> int:
        return self.rows

    def append(self, table) -> None:
        """Append an Arrow table of ``schema``'s columns (before ``close``)."""
        if self._reader is not None:
            raise RuntimeError(f"{self.prefix} spill: append after close")
        self._pending.append(table.select(self.schema.names).cast(self.schema))
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        while self._pending_rows >= self.group_rows:
            self._flush(self.group_rows)

    def _flush(self, n: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._writer is None:
            self._writer = pq.ParquetWriter(self._file, self.schema, compression="none")
        table = pa.concat_tables(self._pending) if self._pending else self.schema.empty_table()
        self._writer.write_table(table.slice(0, n), row_group_size=max(n, 1))
        rest = table.slice(n)
        self._pending, self._pending_rows = [rest], rest.num_rows

    def close(self) -> None:
        """Finish writing; the rows can be read from now on."""
        import pyarrow.parquet as pq

        if self._reader is not None:
            return
        if self._pending_rows or self._writer is None:
            self._flush(self._pending_rows)
        self._writer.close()
        self._writer = None
        self._pending = []
        self._reader = pq.ParquetFile(self._file)

    def _groups(self, groups, columns):
        if self._reader is None:
            raise RuntimeError(f"{self.prefix} spill: read before close")
        return self._reader.read_row_groups(list(groups), columns=columns)

    def read(self, start: int, stop: int, columns: list[str] | None = None):
        """Rows ``start:stop`` as an Arrow table."""
        stop = min(stop, self.rows)
        if stop <= start:
            return self.schema.empty_table().select(columns or self.schema.names)
        first, last = start // self.group_rows, (stop - 1) // self.group_rows
        table = self._groups(range(first, last + 1), columns)
        return table.slice(start - first * self.group_rows, stop - start)

    def take(self, positions: np.ndarray, columns: list[str] | None = None):
        """The rows at ``positions`` (in that order) as an Arrow table."""
        import pyarrow as pa

        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) == 0:
            return self.schema.empty_table().select(columns or self.schema.names)
        groups = np.unique(positions // self.group_rows)
        table = self._groups(groups.tolist(), columns)
        starts = np.searchsorted(groups, positions // self.group_rows) * self.group_rows
        return table.take(pa.array(starts + positions % self.group_rows))

    def batches(self, columns: list[str] | None = None, rows: int = 8192) -> Iterator:
        """Every row in order, as Arrow tables of at most ``rows`` rows."""
        for start in range(0, self.rows, rows):
            yield self.read(start, start + rows, columns)


class ExternalSort:
    """Rows of ``schema`` sorted by the columns ``by`` in bounded memory.

    Every ``run_rows`` appended rows are sorted and written as row groups of ``batch_rows`` to
    one anonymous temporary Parquet file (one file, whatever the number of runs: no limit on
    open files); ``merged`` merges the runs a row group of each at a time. Memory holds one run,
    or a batch of every run while merging: 1M rows are 61 runs of 16,384, merged from 61
    batches of 1,024 rows.
    """

    def __init__(self, schema, by: list[str], run_rows: int, batch_rows: int, prefix: str) -> None:
        self.schema, self.by, self.run_rows, self.batch_rows = schema, list(by), run_rows, batch_rows
        self.prefix = prefix
        self._sort_keys = [(c, "ascending") for c in self.by]
        self.pending: list = []
        self.count = 0
        self.runs: list[int] = []  # rows of each run written
        self._file = None
        self._writer = None

    def add(self, table) -> None:
        self.pending.append(table)
        self.count += table.num_rows
        if self.count >= self.run_rows:
            self._spill()

    def _sorted_pending(self):
        import pyarrow as pa

        table = pa.concat_tables(self.pending) if self.pending else self.schema.empty_table()
        self.pending, self.count = [], 0
        return table.sort_by(self._sort_keys)

    def _spill(self) -> None:
        import pyarrow.parquet as pq

        if self._writer is None:
            self._file = _temporary(self.prefix)
            self._writer = pq.ParquetWriter(self._file, self.schema, compression="none")
        table = self._sorted_pending()
        self._writer.write_table(table, row_group_size=self.batch_rows)
        self.runs.append(table.num_rows)
        del table
        release_arrow_memory()  # the sort's transient

    def _run_batches(self, reader, groups: list[int]) -> Iterator:
        for g in groups:
            yield reader.read_row_group(g)

    def merged(self) -> Iterator:
        """The rows in sorted order, as tables of at most a few batches."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.runs:
            yield self._sorted_pending()
            return
        if self.count:
            self._spill()
        self._writer.close()
        reader = pq.ParquetFile(self._file)
        # each run's row groups: the file's row groups in order, by the runs' row counts
        groups: list[list[int]] = [[] for _ in self.runs]
        run, left = 0, self.runs[0]
        for g in range(reader.metadata.num_row_groups):
            while left == 0:
                run += 1
                left = self.runs[run]
            groups[run].append(g)
            left -= reader.metadata.row_group(g).num_rows
        readers = [self._run_batches(reader, gs) for gs in groups]
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
        if self._writer is not None:
            self._writer.close()
        if self._file is not None:
            self._file.close()
        self._file = self._writer = None
        self.runs = []

    def __enter__(self) -> ExternalSort:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
