"""`dask worker --preload` module for tests: a shard task holding the sample named by
``MODALSTORE_POISON_KEY`` kills its worker process (as a decoder crash on a poison input would)."""

import os

import pipelines.extract as extract

# Dask may import a preload twice (nanny and worker): wrap the original function only once.
_real = getattr(extract, "_unpoisoned_extract_shard", extract.extract_shard)
extract._unpoisoned_extract_shard = _real


def _poisoned(plan, groups, store):
    if any(s.key == os.environ.get("MODALSTORE_POISON_KEY") for s in plan.samples):
        os._exit(1)
    return _real(plan, groups, store)


extract.extract_shard = _poisoned
