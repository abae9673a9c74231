"""Extraction: manifest + config -> one task per shard -> WebDataset shards + Parquet catalog.

The task (``extract_shard``) is a pure module-level function, so a Dask worker or the
current process can run it. Each task owns its output files and returns catalog rows;
the driver combines them and writes the catalog and ``store.json`` last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from features.errors import ConfigError, ExtractionError, ModalstoreError, StoreError
from features.registry import create_extractor, get_extractor
from pipelines.config import load_config, to_dict
from pipelines.manifest import Manifest, SampleTable, read_manifest
from pipelines.media import decode
from pipelines.shards import Layout, ShardPlan, ShardWriter, plan_shards
from pipelines.spill import release_arrow_memory, system_memory_pool
from pipelines.stats import field_moments, finalize, merge_moments, stats_bytes
from pipelines.storage import Location, read_url
from pipelines.store import STORE_FILE, write_catalog, write_store_manifest
from pipelines.versions import (
    VERSIONS_DIR,
    config_hash,
    find_fitted,
    fit_key,
    group_version,
    load_part,
    read_group_meta,
    remove_leftovers,
    reuse_shard,
    rows_hash,
    same_config_versions,
    save_part,
    shard_rel,
    slim_part,
    write_group_meta,
)

_GROUP_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
MISSING_MEDIA_POLICIES = ("error", "record")


@dataclass(frozen=True)
class GroupConfig:
    """One feature group: an extractor and its parameters."""

    extractor: str
    params: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=dict)  # Dask worker resources, e.g. {GPU: 1}
    # fit-then-transform only: fit on at most this many train rows, evenly spaced (None: all).
    # The fit task holds the media it fits on; this bounds its memory on a large train split.
    fit_samples: int | None = None


@dataclass(frozen=True)
class ExtractConfig:
    """The ``modalstore extract`` config file (paths relative to the working directory)."""

    manifest: str
    store: str
    groups: dict[str, GroupConfig]
    samples_per_shard: int = 256
    missing_media: str = "error"
    max_errors: float | None = None  # abort past this many per-sample errors (a count, or a fraction < 1)
    remote_timeout: float = 60.0  # seconds before a read of a media URL (s3://, http://...) gives up

    def __post_init__(self) -> None:
        if not self.groups:
            raise ConfigError("groups: at least one feature group is required")
        for name, group in self.groups.items():
            if not _GROUP_NAME.match(name):
                raise ConfigError(f"groups.{name}: group names are lower-case identifiers ([a-z][a-z0-9_]*)")
            cls = get_extractor(group.extractor)  # unknown extractor -> ConfigError listing the valid ones
            if group.fit_samples is not None:
                if not cls.fit_required:
                    raise ConfigError(
                        f"groups.{name}.fit_samples: extractor {group.extractor!r} is not fitted; "
                        "remove fit_samples (it applies to fit-then-transform extractors only)"
                    )
                if group.fit_samples < 1:
                    raise ConfigError(f"groups.{name}.fit_samples: must be >= 1, got {group.fit_samples}")
        if self.samples_per_shard < 1:
            raise ConfigError(f"samples_per_shard: must be >= 1, got {self.samples_per_shard}")
        if self.missing_media not in MISSING_MEDIA_POLICIES:
            raise ConfigError(f"missing_media: {self.missing_media!r} is not one of {MISSING_MEDIA_POLICIES}")
        if not self.remote_timeout > 0:
            raise ConfigError(f"remote_timeout: must be > 0 seconds, got {self.remote_timeout}")
        if self.max_errors is not None and self.max_errors < 0:
            raise ConfigError(
                f"max_errors: must be >= 0 (a count, or a fraction below 1), got {self.max_errors}"
            )

    def error_budget(self, n_samples: int) -> float:
        """How many per-sample errors a run may record before it aborts."""
        if self.max_errors is None:
            return float("inf")
        return self.max_errors * n_samples if 0 < self.max_errors < 1 else self.max_errors


def load_extract_config(path: str | Path, overrides: list[str] | None = None) -> ExtractConfig:
    return load_config(ExtractConfig, path, overrides)


@dataclass(frozen=True)
class GroupTask:
    """What a shard task needs to know of a group (picklable)."""

    name: str
    extractor: str
    params: dict[str, Any]
    modality: str
    artifact: str | None = None  # fitted state (.npz) of a fit-then-transform extractor
    artifact_sha: str | None = None  # its sha256 (part of the group's version)
    remote_timeout: float = 60.0  # per media URL read, from ExtractConfig
    version: str = ""  # content hash naming the group's output (pipelines/versions.py)
    config_hash: str = ""  # the version without the manifest: shards with the same rows are reused
    fit_samples: int | None = None  # fit on at most this many train rows (GroupConfig.fit_samples)


# One extractor instance per process and configuration: models load once per worker.
_EXTRACTORS: dict[str, Any] = {}


def _extractor(task: GroupTask):
    cache_key = json.dumps([task.extractor, task.params, task.artifact], sort_keys=True, default=str)
    ex = _EXTRACTORS.get(cache_key)
    if ex is None:
        ex = create_extractor(task.extractor, task.params)
        if task.artifact is not None:
            with np.load(io.BytesIO(read_url(task.artifact)), allow_pickle=False) as npz:
                ex.load_artifact({k: npz[k] for k in npz.files})
        ex.setup()
        _pin_threads()  # setup may have imported torch or OpenCV
        _EXTRACTORS[cache_key] = ex
    return ex


def fit_group(task: GroupTask, chunks: list) -> dict:
    """Fit a fit-then-transform extractor on the given (train-split) samples, in ``chunks``
    (sequences of samples: the driver sends them one at a time, never the whole split at once).

    Returns the artifact as ``.npz`` bytes plus error rows for media that failed to decode
    (they are left out of the fit, and recorded).
    """
    _pin_threads()
    ex = create_extractor(task.extractor, task.params)
    medias, errors = [], []
    request = ex.decode_request()
    for sample in (s for chunk in chunks for s in chunk):
        source = sample.media.get(task.modality)
        if source is None:
            continue
        try:
            medias.append(decode(task.modality, source, request, timeout=task.remote_timeout))
        except Exception as exc:  # noqa: BLE001 - recorded, left out of the fit
            errors.append(_error_row(sample, task.name, "", "fit", exc))
    if not medias:
        raise ExtractionError(
            f"group {task.name!r}: extractor {task.extractor!r} must be fitted on the train split, "
            f"but no train sample has decodable {task.modality!r} media"
        )
    ex.setup()
    _pin_threads()
    ex.fit(medias)
    arrays = ex.artifact()
    for key, arr in arrays.items():
        if np.asarray(arr).dtype.kind == "O":
            raise ExtractionError(f"extractor {task.extractor!r}: artifact array {key!r} has object dtype")
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in sorted(arrays.items())})
    return {"npz": buf.getvalue(), "errors": errors, "fitted_on": len(medias)}


_TORCH_THREADS: list[int] = []  # torch's own thread count, before we first pinned it


def _pin_threads() -> None:
    """One thread for OpenCV and (once something imported it) torch.

    Besides sharing cores fairly between worker processes, this makes model outputs
    independent of where a task runs: float reductions split over a different number of
    threads round differently, and stores must be byte-identical whatever the executor.
    torch is not imported here: an MFCC job should not pay its 2-3 s import; extractors
    that need it import it in ``setup``, after which this is called again.
    """
    if "cv2" in sys.modules:
        sys.modules["cv2"].setNumThreads(1)
    torch = sys.modules.get("torch")
    if torch is not None:
        if not _TORCH_THREADS:
            _TORCH_THREADS.append(torch.get_num_threads())
        torch.set_num_threads(1)


def _restore_threads() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and _TORCH_THREADS:
        torch.set_num_threads(_TORCH_THREADS[0])


def _error_row(
    sample, group: str, shard: str, stage: str, exc: BaseException, message: str | None = None
) -> dict:
    return {
        "key": sample.key,
        "group": group,
        "shard": shard,
        "stage": stage,
        "error_type": type(exc).__name__,
        "message": (str(exc) if message is None else message)[:2000],
    }


def _check_outputs(ex, spec: dict, out: dict[str, np.ndarray]) -> None:
    if set(out) != set(spec):
        raise ModalstoreError(
            f"extractor {ex.name!r} returned fields {sorted(out)}, spec says {sorted(spec)}"
        )
    for name, arr in out.items():
        spec[name].check(name, arr)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ModalstoreError(f"extractor {ex.name!r}, field {name!r}: output contains NaN or Inf")


def extract_shard(plan: ShardPlan, groups: tuple[GroupTask, ...], store: str) -> dict:
    """Compute the given groups for the samples of one shard and write one tar per group.

    Per-sample failures become error rows and a placeholder (``present: false``), so
    every group's shard holds the same keys in the same order. Each group's tar goes to
    ``shards/<group>/<version>/`` and its catalog rows to that version's part, written
    after the tar is in place: returns ``{"shard", "parts": {group: part}, "seconds"}``.
    """
    _pin_threads()
    t0 = time.perf_counter()
    if not isinstance(plan.samples, SampleTable):  # run in the driver: read the rows once
        plan = dataclasses.replace(plan, samples=plan.samples.table())
    n = len(plan.samples)
    rows = rows_hash(plan)
    parts: dict[str, dict] = {}
    decoded_cache: dict[tuple, Any] = {}
    for g in groups:
        ex = _extractor(g)
        spec = ex.output_spec()
        request = ex.decode_request()
        request_key = json.dumps(request, sort_keys=True)
        errors: list[dict] = []
        outputs: list[dict | None] = [None] * n
        todo, medias = [], []
        for i, sample in enumerate(plan.samples):
            source = sample.media.get(g.modality)
            if source is None:
                continue  # modality absent in the manifest: placeholder, not an error
            ck = (g.modality, source, request_key)
            try:
                if ck not in decoded_cache:
                    decoded_cache[ck] = decode(g.modality, source, request, timeout=g.remote_timeout)
                media = decoded_cache[ck]
            except Exception as exc:  # noqa: BLE001 - recorded per sample by policy
                errors.append(_error_row(sample, g.name, plan.name, "decode", exc))
                continue
            todo.append(i)
            medias.append(media)
        if todo:
            try:
                results = ex.extract_batch(medias)
            except Exception:  # noqa: BLE001 - isolate the failing sample(s) one by one
                results = []
                for i, media in zip(todo, medias, strict=True):
                    try:
                        results.append(ex.extract(media))
                    except Exception as exc:  # noqa: BLE001
                        errors.append(_error_row(plan.samples[i], g.name, plan.name, "extract", exc))
                        results.append(None)
            for i, out in zip(todo, results, strict=True):
                if out is None:
                    continue
                try:
                    _check_outputs(ex, spec, out)
                except Exception as exc:  # noqa: BLE001
                    errors.append(_error_row(plan.samples[i], g.name, plan.name, "extract", exc))
                    continue
                outputs[i] = out
        moments = {}  # train split only: the statistics the loader normalises with
        if plan.split == "train":
            moments = {
                f: field_moments([o[f] for o in outputs if o is not None], spec[f].variable) for f in spec
            }
        parts[g.name] = slim_part(write_group_shard(store, g, plan, rows, outputs, errors, moments))
        if not _later_uses(groups, g):  # free decoded media no later group needs
            decoded_cache = {k: v for k, v in decoded_cache.items() if k[0] != g.modality}
    return {"shard": plan.name, "parts": parts, "seconds": time.perf_counter() - t0}


def write_group_shard(
    store: str,
    g: GroupTask,
    plan: ShardPlan,
    rows: str,
    outputs: list[dict | None],
    errors: list[dict],
    moments: dict,
    failed: bool = False,
) -> dict:
    """Write one group's tar for a shard (``None`` outputs become ``present: false``
    placeholders), publish it, then record its part; returns the part."""
    loc = Location(store)
    rel = shard_rel(g.name, g.version, plan.name)
    path = loc.staging_dir(rel) / f"{plan.name}.tar"
    with ShardWriter(path) as writer:
        for sample, out in zip(plan.samples, outputs, strict=True):
            meta = {
                "key": sample.key,
                "label": sample.label,
                "split": sample.split,
                "present": out is not None,
            }
            writer.add_sample(sample.key, meta, out or {})
        size, digest = writer.close()
    _publish(loc, path, rel)
    part = {
        "group": g.name,
        "version": g.version,
        "shard": plan.name,
        "rows": rows,
        **({"failed": True} if failed else {}),
        "present": [o is not None for o in outputs],
        "errors": errors,
        "file": {
            "group": g.name,
            "version": g.version,
            "shard": plan.name,
            "split": plan.split,
            "samples": len(plan.samples),
            "bytes": size,
            "sha256": digest,
        },
        "members": [[m.name, m.offset, m.size] for m in writer.members],
        "moments": moments,
    }
    save_part(loc, part)
    return part


def _publish(loc: Location, path: Path, rel: str) -> None:
    """Move a finished local shard to its place in the store (an upload for a remote store)."""
    loc.put_file(path, rel)
    if loc.remote:
        shutil.rmtree(path.parent, ignore_errors=True)  # the staging folder


def failed_shard(plan: ShardPlan, groups: tuple[GroupTask, ...], store: str, exc: BaseException) -> dict:
    """Placeholders for a shard whose task kept killing its worker (a poison input).

    Every sample gets ``present: false`` in every group and an error row (stage ``worker``),
    so the store stays aligned and the rest of the job completes. The parts are marked
    ``failed``: the next ``extract`` retries the shard instead of keeping the placeholders.
    """
    rows = rows_hash(plan)
    message = (
        f"the task for shard {plan.name} killed its Dask worker too often "
        f"(distributed.scheduler.allowed-failures): {exc}; re-run extract to retry this shard"
    )
    parts = {}
    for g in groups:
        errors = [_error_row(s, g.name, plan.name, "worker", exc, message) for s in plan.samples]
        nothing = [None] * len(plan.samples)
        parts[g.name] = slim_part(write_group_shard(store, g, plan, rows, nothing, errors, {}, failed=True))
    return {"shard": plan.name, "parts": parts, "seconds": 0.0}


def _later_uses(groups: tuple[GroupTask, ...], g: GroupTask) -> bool:
    idx = groups.index(g)
    return any(other.modality == g.modality for other in groups[idx + 1 :])


@dataclass
class ExtractSummary:
    store: str
    samples: int
    shards: int
    errors: int
    seconds: float
    error_rows: list[dict]
    up_to_date: bool = False
    resumed_shards: int = 0  # shards every group of which was finished before this run
    computed: dict[str, int] = field(default_factory=dict)  # group -> shards computed in this run
    reused: dict[str, int] = field(default_factory=dict)  # group -> shards linked from another version
    failed_shards: list[str] = field(default_factory=list)  # tasks that kept killing their worker

    def __str__(self) -> str:
        if self.up_to_date:
            return (
                f"{self.store} is up to date ({self.samples} samples in {self.shards} shards); nothing to do"
            )
        text = (
            f"wrote {self.samples} samples in {self.shards} shards to {self.store} "
            f"in {self.seconds:.1f} s; {self.errors} per-sample error(s)"
        )
        work = [
            f"{g}: {self.computed.get(g, 0)} computed, {self.reused.get(g, 0)} reused"
            for g in sorted(set(self.computed) | set(self.reused))
        ]
        if work:
            text += "\n  shards per group: " + "; ".join(work)
        if self.failed_shards:
            text += (
                f"\n  {len(self.failed_shards)} shard(s) failed (their task kept killing its worker; "
                f"placeholders written, re-run to retry): {', '.join(self.failed_shards)}"
            )
        return text


def group_meta(task: GroupTask, ex, artifact: dict | None = None) -> dict:
    """The ``store.json`` entry of one group (fields of a fitted extractor need its artifact)."""
    meta = {
        "extractor": task.extractor,
        "extractor_version": type(ex).version,
        "version": task.version,
        "modality": task.modality,
        "params": task.params,
        "fields": None
        if ex.fit_required and artifact is None
        else {k: v.to_dict() for k, v in ex.output_spec().items()},
        "dir": f"shards/{task.name}/{task.version}" if task.version else None,
    }
    if artifact is not None:
        meta["artifact"] = artifact
    return meta


def run_identity(plans: list[ShardPlan], tasks: tuple[GroupTask, ...]) -> str:
    """What a finished store is a function of: every group's version and the shard layout."""
    body = {
        "groups": {t.name: t.version for t in tasks},
        "layout": [[p.name, rows_hash(p)] for p in plans],
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def previous_layout(loc: Location, samples_per_shard: int) -> Layout | None:
    """The finished store's sample -> (shard, index) layout, when it used the same shard size."""
    if not loc.exists(STORE_FILE):
        return None
    try:
        meta = json.loads(loc.read_bytes(STORE_FILE))
        if meta.get("config", {}).get("samples_per_shard") != samples_per_shard:
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = loc.read_bytes("catalog/samples.parquet")
        table = pq.read_table(pa.BufferReader(data), columns=["key", "shard", "index"])
    except (OSError, ValueError, KeyError):
        return None  # an unreadable old store: plan afresh (the shards are recomputed, not trusted)
    return Layout(
        table.column("key").combine_chunks(),
        table.column("shard").combine_chunks(),
        table.column("index").to_numpy().astype(np.int64),
    )


def prepare(
    config: ExtractConfig, incremental: bool = True, progress: bool = False
) -> tuple[Manifest, list[ShardPlan], tuple[GroupTask, ...], dict]:
    """Validate everything before any work starts: manifest, groups, parameters; plan shards.

    With ``incremental``, samples already in the store keep their shards (appended rows go
    to new shards); ``progress`` shows the manifest's rows as they are validated.
    """
    manifest = read_manifest(config.manifest, check_files=config.missing_media == "error", progress=progress)
    tasks, metas = [], {}
    for name, gc in config.groups.items():
        ex = create_extractor(gc.extractor, dict(gc.params))
        if ex.modality not in manifest.modalities:
            raise ConfigError(
                f"groups.{name}: extractor {gc.extractor!r} needs {ex.modality!r} media, "
                f"but manifest {manifest.path} has none (modalities present: {manifest.modalities})"
            )
        task = GroupTask(
            name=name,
            extractor=gc.extractor,
            params=ex.params(),
            modality=ex.modality,
            remote_timeout=config.remote_timeout,
            fit_samples=gc.fit_samples,
        )
        tasks.append(task)
        metas[name] = group_meta(task, ex)
    previous = previous_layout(Location(config.store), config.samples_per_shard) if incremental else None
    plans = plan_shards(manifest.samples, config.samples_per_shard, previous)
    return manifest, plans, tuple(tasks), metas


def version_tasks(
    config: ExtractConfig, manifest: Manifest, tasks: tuple[GroupTask, ...]
) -> tuple[GroupTask, ...]:
    """Give every task its config hash and version (fitted tasks need their artifact first)."""
    out = []
    for task in tasks:
        cfg = config_hash(
            task.extractor,
            get_extractor(task.extractor).version,
            task.params,
            task.artifact_sha,
            config.samples_per_shard,
            config.missing_media,
        )
        out.append(
            dataclasses.replace(task, config_hash=cfg, version=group_version(cfg, manifest.fingerprint))
        )
    return tuple(out)


def fit_groups(
    store: Location,
    manifest: Manifest,
    tasks: tuple[GroupTask, ...],
    metas: dict,
    client=None,
    resources=None,
) -> tuple[tuple[GroupTask, ...], dict[str, list[dict]]]:
    """Fit every fit-then-transform group on the TRAIN split only; save artifacts in the store.

    A group fitted before with the same extractor, parameters and train rows reuses that
    artifact instead of fitting again. Returns the tasks (with artifact paths) and, per
    group, the error rows of media left out of its fit.
    """
    out, errors = [], {}
    for task in tasks:
        cls = get_extractor(task.extractor)
        if not cls.fit_required:
            out.append(task)
            continue
        train = fit_rows(manifest, task)
        key = fit_key(task.extractor, cls.version, task.params, train)
        fitted = find_fitted(store, task.name, key)
        if fitted is not None:
            artifact = fitted["artifact"]
            errors[task.name] = list(fitted.get("fit_errors", []))
        else:
            if client is None:
                result = fit_group(task, [train])
            else:
                chunks = [
                    client.scatter(train[i : i + _FIT_CHUNK], hash=False)
                    for i in range(0, len(train), _FIT_CHUNK)
                ]
                dkey = f"fit-{task.name}-{uuid.uuid4().hex[:8]}"
                result = client.submit(fit_group, task, chunks, key=dkey, resources=resources).result()
                del chunks
            digest = hashlib.sha256(result["npz"]).hexdigest()
            rel = f"artifacts/{task.name}-{digest[:16]}.npz"
            store.write_bytes(rel, result["npz"])
            artifact = {
                "path": rel,
                "sha256": digest,
                "fitted_on": result["fitted_on"],
                "split": "train",
                "fit_key": key,
            }
            errors[task.name] = result["errors"]
        path = store.join(artifact["path"])
        task = dataclasses.replace(
            task, artifact=str(path if store.remote else path.resolve()), artifact_sha=artifact["sha256"]
        )
        metas[task.name] = group_meta(task, _extractor(task), artifact)
        out.append(task)
    return tuple(out), errors


_FIT_CHUNK = 8192  # train rows per message to the fit task


def fit_rows(manifest: Manifest, task: GroupTask):
    """The train rows a fit-then-transform group is fitted on: all of them, or ``fit_samples``
    evenly spaced ones (the same every run, so the artifact is reused)."""
    train = manifest.split("train")
    n, k = len(train), task.fit_samples
    if k is None or n <= k:
        return train
    return train.at(np.arange(k, dtype=np.int64) * n // k)


def _in_flight(client) -> int:
    """Shard tasks to keep submitted: two per worker thread (a queue for every thread while
    results come back), at least 8 (a cluster still scaling up)."""
    threads = sum(w.get("nthreads", 1) for w in client.scheduler_info().get("workers", {}).values())
    return max(8, 2 * threads)


def _task_resources(config: ExtractConfig, client) -> dict[str, float] | None:
    """Worker resources a shard task needs: the largest amount any group asks for.

    Model-based groups can ask for ``{GPU: 1}`` so shard tasks run only on workers started
    with ``dask worker ... --resources GPU=1``; a resource no worker offers is an error, not
    a job that waits forever.
    """
    wanted: dict[str, float] = {}
    for group in config.groups.values():
        for res, amount in group.resources.items():
            wanted[res] = max(wanted.get(res, 0.0), float(amount))
    if not wanted:
        return None
    offered: dict[str, float] = {}
    for worker in client.scheduler_info()["workers"].values():
        for res, amount in (worker.get("resources") or {}).items():
            offered[res] = max(offered.get(res, 0.0), float(amount))
    for res, amount in wanted.items():
        if offered.get(res, 0.0) < amount:
            raise ConfigError(
                f"a group asks for worker resource {res}={amount:g}, but no worker of the cluster offers it "
                f"(offered: {offered or 'none'}); start workers with `dask worker SCHEDULER --resources {res}={amount:g}` "
                "or remove the group's `resources`"
            )
    return wanted


def _check_error_budget(
    config: ExtractConfig, store: Location, manifest: Manifest, errors: list[dict]
) -> None:
    budget = config.error_budget(len(manifest))
    if len(errors) > budget:
        last = errors[-1]
        raise ExtractionError(
            f"{store}: {len(errors)} per-sample errors exceed max_errors={config.max_errors:g}; "
            f"last: {last['key']} [{last['group']}/{last['stage']}] {last['message']}. "
            "The finished shards are kept: fix the inputs and re-run (only the rest is computed), "
            "or raise max_errors and re-run to resume"
        )


def _check_store_path(store: Location) -> None:
    if not store.is_empty():
        known = (STORE_FILE, VERSIONS_DIR, "shards")
        if not any(store.exists(name) for name in known):
            raise StoreError(
                f"{store}: exists, is not empty and is not a modalstore store; choose another path"
            )


def _wipe(store: Location) -> None:
    store.remove(STORE_FILE)  # first: a store without it is incomplete
    for sub in ("shards", "catalog", "artifacts", "stats", VERSIONS_DIR, ".extract"):
        store.remove(sub)


def run_extract(
    config: ExtractConfig, client=None, overwrite: bool = False, progress: bool = True
) -> ExtractSummary:
    """Bring the store at ``config.store`` up to date with ``config``, on ``client`` (Dask) or serially.

    Only what is missing is computed: a shard of a group version that is finished (an
    earlier or interrupted run) is kept, and one whose rows and group config are unchanged
    since another version is linked from it. ``overwrite`` empties the store first.
    """
    with system_memory_pool():  # the driver's memory stays flat in the number of samples
        return _run_extract(config, client, overwrite, progress)


def _run_extract(config: ExtractConfig, client, overwrite: bool, progress: bool) -> ExtractSummary:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    store = Location(config.store)
    _check_store_path(store)
    manifest, plans, tasks, metas = prepare(config, incremental=not overwrite, progress=progress)
    if overwrite:
        _wipe(store)
    resources = _task_resources(config, client) if client is not None else None
    tasks, fit_errors = fit_groups(store, manifest, tasks, metas, client, resources)
    tasks = version_tasks(config, manifest, tasks)
    for task in tasks:
        metas[task.name] = {
            **metas[task.name],
            "version": task.version,
            "dir": f"shards/{task.name}/{task.version}",
        }
    identity = run_identity(plans, tasks)
    if store.exists(STORE_FILE) and json.loads(store.read_bytes(STORE_FILE)).get("identity") == identity:
        return ExtractSummary(
            str(store), len(manifest), len(plans), 0, time.perf_counter() - t0, [], up_to_date=True
        )
    for task in tasks:
        if read_group_meta(store, task.name, task.version) is None:
            body = {
                **metas[task.name],
                "config_hash": task.config_hash,
                "manifest": manifest.fingerprint,
                "fit_errors": fit_errors.get(task.name, []),
            }
            write_group_meta(store, task.name, task.version, body)
    remove_leftovers(store)  # a killed task's unfinished shard

    parts: dict[str, dict[str, dict]] = {t.name: {} for t in tasks}  # group -> shard -> part
    reused = {t.name: 0 for t in tasks}
    siblings = {t.name: same_config_versions(store, t.name, t.version, t.config_hash) for t in tasks}
    todo: list[tuple[ShardPlan, tuple[GroupTask, ...]]] = []
    for plan in plans:
        missing = []
        for task in tasks:
            part = load_part(store, task.name, task.version, plan)
            if part is None:
                part = reuse_shard(store, task.name, task.version, siblings[task.name], plan)
                reused[task.name] += part is not None
            if part is None:
                missing.append(task)
            else:
                parts[task.name][plan.name] = slim_part(part)
        if missing:
            todo.append((plan, tuple(missing)))
    resumed = sum(1 for p in plans if all(p.name in parts[t.name] for t in tasks))
    if progress and todo and resumed:
        print(f"{len(plans) - len(todo)} of {len(plans)} shards already done", file=sys.stderr)
    errors = [e for rows in fit_errors.values() for e in rows]
    errors += [e for by_shard in parts.values() for part in by_shard.values() for e in part["errors"]]

    def collect(result: dict) -> None:
        for name, part in result["parts"].items():
            parts[name][result["shard"]] = part
            errors.extend(part["errors"])
        bar.update(1)
        _check_error_budget(config, store, manifest, errors)

    bar = tqdm(
        total=len(plans), initial=len(plans) - len(todo), desc="extract", unit="shard", disable=not progress
    )
    root = str(store) if store.remote else str(store.path.resolve())
    if client is None:
        try:
            for plan, groups in todo:
                collect(extract_shard(plan, groups, root))
        finally:
            _restore_threads()
    else:
        from distributed import KilledWorker, as_completed

        run_id = uuid.uuid4().hex[:8]
        pending = iter(todo)
        futures: dict = {}  # in flight: future -> (plan, groups)

        def submit(plan: ShardPlan, groups: tuple[GroupTask, ...], suffix: str = ""):
            key = f"extract-{plan.name}-{run_id}{suffix}"
            fut = client.submit(extract_shard, plan, groups, root, key=key, resources=resources)
            futures[fut] = (plan, groups)
            return fut

        def submit_more(done) -> None:
            """Keep ``_in_flight(client)`` tasks submitted: a task's message carries its shard's
            rows, so the driver holds a bounded window of them, not the whole manifest."""
            for plan, groups in pending:
                done.add(submit(plan, groups))
                if len(futures) >= _in_flight(client):
                    return

        suspects: list[tuple[ShardPlan, tuple[GroupTask, ...]]] = []
        try:
            done = as_completed()
            submit_more(done)
            for fut in done:
                args = futures.pop(fut)  # the future and its task's arguments go once collected
                try:
                    collect(fut.result())
                except KilledWorker:  # Dask rescheduled it and gave up: a poison input, or its neighbour
                    suspects.append(args)
                del fut
                submit_more(done)
            # A dying worker charges a failure to every task it held, the poison's innocent
            # neighbours too. So a task Dask gave up on is run once more, alone on the cluster:
            # only a task that kills its worker by itself is reported failed.
            for plan, groups in suspects:
                fut = submit(plan, groups, "-alone")
                try:
                    result = fut.result()
                except KilledWorker as exc:
                    result = failed_shard(plan, groups, root, exc)
                del futures[fut], fut
                collect(result)
        except BaseException:
            client.cancel(list(futures))
            raise
    bar.close()
    release_arrow_memory()  # the shards' rows read back from the manifest spill
    remove_leftovers(store)  # temporary files of attempts on workers that were killed
    all_errors = [e for rows in fit_errors.values() for e in rows] + [
        e for plan in plans for t in tasks for e in parts[t.name][plan.name]["errors"]
    ]
    failed = sorted({p.name for p in plans for t in tasks if parts[t.name][p.name].get("failed")})
    _finish_store(
        store, config, manifest, plans, tasks, metas, parts, fit_errors, identity, failed, len(all_errors)
    )
    computed = {t.name: sum(1 for _, gs in todo if t in gs) for t in tasks}
    return ExtractSummary(
        str(store),
        len(manifest),
        len(plans),
        len(all_errors),
        time.perf_counter() - t0,
        all_errors,
        resumed_shards=resumed,
        computed=computed,
        reused=reused,
        failed_shards=failed,
    )


def _finish_store(
    store, config, manifest, plans, tasks, metas, parts, fit_errors, identity, failed, n_errors
) -> None:
    """Statistics per version, the catalog of the active versions, and store.json last.

    A store with ``failed`` shards (placeholders) gets no identity, so the next run retries them.
    """
    for task in tasks:
        stats_rel = f"{VERSIONS_DIR}/{task.name}/{task.version}/stats.npz"
        partial = f"{VERSIONS_DIR}/{task.name}/{task.version}/stats.partial"  # a shard failed
        if not store.exists(stats_rel) or store.exists(partial):
            store.remove(partial)
            if any(parts[task.name][p.name].get("failed") for p in plans):
                store.write_bytes(partial, b"")
            stats = {}
            for f in metas[task.name]["fields"]:
                merged = None
                for plan in plans:
                    merged = merge_moments(merged, parts[task.name][plan.name]["moments"].get(f))
                if merged is not None:
                    stats[f] = finalize(merged)
            if stats:
                store.write_bytes(stats_rel, stats_bytes(stats))
        if store.exists(stats_rel):
            metas[task.name]["stats"] = {"path": stats_rel, "split": "train"}
    write_catalog(store, plans, tasks, parts, fit_errors)
    write_store_manifest(
        store,
        {
            "manifest": {
                "path": str(Path(manifest.path).resolve()),
                "sha256": manifest.fingerprint,
                "rows": len(manifest),
            },
            "classes": manifest.classes,
            "splits": {
                split: {
                    "samples": sum(len(p.samples) for p in plans if p.split == split),
                    "shards": [p.name for p in plans if p.split == split],
                    "shard_samples": [len(p.samples) for p in plans if p.split == split],
                }
                for split in ("train", "val", "test")
            },
            "groups": metas,
            "config": to_dict(config),
            "identity": None if failed else identity,
            "failed_shards": failed,
            "errors": n_errors,
        },
    )
