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
from pipelines.manifest import Manifest, Sample, read_manifest
from pipelines.media import decode
from pipelines.resume import STATE_DIR, load_part, save_part
from pipelines.shards import ShardPlan, ShardWriter, plan_shards, write_atomic
from pipelines.stats import field_moments, finalize, merge_moments, save_stats
from pipelines.store import STORE_FILE, write_catalog, write_store_manifest

_GROUP_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
MISSING_MEDIA_POLICIES = ("error", "record")


@dataclass(frozen=True)
class GroupConfig:
    """One feature group: an extractor and its parameters."""

    extractor: str
    params: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=dict)  # Dask worker resources, e.g. {GPU: 1}


@dataclass(frozen=True)
class ExtractConfig:
    """The ``modalstore extract`` config file (paths relative to the working directory)."""

    manifest: str
    store: str
    groups: dict[str, GroupConfig]
    samples_per_shard: int = 256
    missing_media: str = "error"
    max_errors: float | None = None  # abort past this many per-sample errors (a count, or a fraction < 1)

    def __post_init__(self) -> None:
        if not self.groups:
            raise ConfigError("groups: at least one feature group is required")
        for name, group in self.groups.items():
            if not _GROUP_NAME.match(name):
                raise ConfigError(f"groups.{name}: group names are lower-case identifiers ([a-z][a-z0-9_]*)")
            get_extractor(group.extractor)  # unknown extractor -> ConfigError listing the valid ones
        if self.samples_per_shard < 1:
            raise ConfigError(f"samples_per_shard: must be >= 1, got {self.samples_per_shard}")
        if self.missing_media not in MISSING_MEDIA_POLICIES:
            raise ConfigError(f"missing_media: {self.missing_media!r} is not one of {MISSING_MEDIA_POLICIES}")
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


# One extractor instance per process and configuration: models load once per worker.
_EXTRACTORS: dict[str, Any] = {}


def _extractor(task: GroupTask):
    cache_key = json.dumps([task.extractor, task.params, task.artifact], sort_keys=True, default=str)
    ex = _EXTRACTORS.get(cache_key)
    if ex is None:
        ex = create_extractor(task.extractor, task.params)
        if task.artifact is not None:
            with np.load(task.artifact, allow_pickle=False) as npz:
                ex.load_artifact({k: npz[k] for k in npz.files})
        ex.setup()
        _pin_threads()  # setup may have imported torch or OpenCV
        _EXTRACTORS[cache_key] = ex
    return ex


def fit_group(task: GroupTask, samples: tuple[Sample, ...]) -> dict:
    """Fit a fit-then-transform extractor on the given (train-split) samples.

    Returns the artifact as ``.npz`` bytes plus error rows for media that failed to decode
    (they are left out of the fit, and recorded).
    """
    _pin_threads()
    ex = create_extractor(task.extractor, task.params)
    medias, errors = [], []
    request = ex.decode_request()
    for sample in samples:
        source = sample.media.get(task.modality)
        if source is None:
            continue
        try:
            medias.append(decode(task.modality, source, request))
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


def _error_row(sample, group: str, shard: str, stage: str, exc: BaseException) -> dict:
    return {
        "key": sample.key,
        "group": group,
        "shard": shard,
        "stage": stage,
        "error_type": type(exc).__name__,
        "message": str(exc)[:2000],
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
    """Compute every group for the samples of one shard and write one tar per group.

    Per-sample failures become error rows and a placeholder (``present: false``), so
    every group's shard holds the same keys in the same order.
    """
    _pin_threads()
    t0 = time.perf_counter()
    n = len(plan.samples)
    present = {g.name: [False] * n for g in groups}
    errors: list[dict] = []
    files: list[dict] = []
    members: list[dict] = []
    decoded_cache: dict[tuple, Any] = {}
    moments: dict[str, dict] = {}  # group -> field -> moments, train split only
    for g in groups:
        ex = _extractor(g)
        spec = ex.output_spec()
        request = ex.decode_request()
        request_key = json.dumps(request, sort_keys=True)
        outputs: list[dict | None] = [None] * n
        todo, medias = [], []
        for i, sample in enumerate(plan.samples):
            source = sample.media.get(g.modality)
            if source is None:
                continue  # modality absent in the manifest: placeholder, not an error
            ck = (g.modality, source, request_key)
            try:
                if ck not in decoded_cache:
                    decoded_cache[ck] = decode(g.modality, source, request)
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
                present[g.name][i] = True
        if plan.split == "train":
            moments[g.name] = {
                f: field_moments([o[f] for o in outputs if o is not None], spec[f].variable) for f in spec
            }
        path = Path(store) / "shards" / g.name / f"{plan.name}.tar"
        with ShardWriter(path) as writer:
            for i, sample in enumerate(plan.samples):
                meta = {
                    "key": sample.key,
                    "label": sample.label,
                    "split": sample.split,
                    "present": outputs[i] is not None,
                }
                writer.add_sample(sample.key, meta, outputs[i] or {})
            size, digest = writer.close()
        files.append(
            {
                "group": g.name,
                "shard": plan.name,
                "split": plan.split,
                "samples": n,
                "bytes": size,
                "sha256": digest,
            }
        )
        members.extend(
            {"group": g.name, "shard": plan.name, "member": m.name, "offset": m.offset, "size": m.size}
            for m in writer.members
        )
        if not _later_uses(groups, g):  # free decoded media no later group needs
            decoded_cache = {k: v for k, v in decoded_cache.items() if k[0] != g.modality}
    rows = [
        {
            "key": s.key,
            "split": s.split,
            "label": s.label,
            "shard": plan.name,
            "index": i,
            **{f"has_{g.name}": present[g.name][i] for g in groups},
        }
        for i, s in enumerate(plan.samples)
    ]
    result = {
        "shard": plan.name,
        "samples": rows,
        "errors": errors,
        "files": files,
        "members": members,
        "moments": moments,
        "seconds": time.perf_counter() - t0,
    }
    save_part(Path(store), result)
    return result


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
    resumed_shards: int = 0

    def __str__(self) -> str:
        if self.up_to_date:
            return (
                f"{self.store} is up to date ({self.samples} samples in {self.shards} shards); nothing to do"
            )
        return (
            f"wrote {self.samples} samples in {self.shards} shards to {self.store} "
            f"in {self.seconds:.1f} s; {self.errors} per-sample error(s)"
        )


def group_meta(task: GroupTask, ex, artifact: dict | None = None) -> dict:
    """The ``store.json`` entry of one group (fields of a fitted extractor need its artifact)."""
    meta = {
        "extractor": task.extractor,
        "version": type(ex).version,
        "modality": task.modality,
        "params": task.params,
        "fields": None
        if ex.fit_required and artifact is None
        else {k: v.to_dict() for k, v in ex.output_spec().items()},
        "dir": f"shards/{task.name}",
    }
    if artifact is not None:
        meta["artifact"] = artifact
    return meta


def run_identity(config: ExtractConfig, manifest: Manifest, tasks: tuple[GroupTask, ...]) -> str:
    """What a store's content is a function of: the manifest's bytes and every group's config."""
    body = {
        "manifest": manifest.fingerprint,
        "samples_per_shard": config.samples_per_shard,
        "missing_media": config.missing_media,
        "groups": {t.name: [t.extractor, get_extractor(t.extractor).version, t.params] for t in tasks},
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def prepare(config: ExtractConfig) -> tuple[Manifest, list[ShardPlan], tuple[GroupTask, ...], dict]:
    """Validate everything before any work starts: manifest, groups, parameters."""
    manifest = read_manifest(config.manifest, check_files=config.missing_media == "error")
    tasks, metas = [], {}
    for name, gc in config.groups.items():
        ex = create_extractor(gc.extractor, dict(gc.params))
        if ex.modality not in manifest.modalities:
            raise ConfigError(
                f"groups.{name}: extractor {gc.extractor!r} needs {ex.modality!r} media, "
                f"but manifest {manifest.path} has none (modalities present: {manifest.modalities})"
            )
        task = GroupTask(name=name, extractor=gc.extractor, params=ex.params(), modality=ex.modality)
        tasks.append(task)
        metas[name] = group_meta(task, ex)
    plans = plan_shards(manifest.samples, config.samples_per_shard)
    return manifest, plans, tuple(tasks), metas


def fit_groups(
    store: Path, manifest: Manifest, tasks: tuple[GroupTask, ...], metas: dict, client=None, resources=None
) -> tuple:
    """Fit every fit-then-transform group on the TRAIN split only; save artifacts in the store.

    Returns the tasks (with artifact paths) and the error rows of media left out of a fit.
    """
    train = tuple(s for s in manifest.samples if s.split == "train")
    out, errors = [], []
    for task in tasks:
        if not get_extractor(task.extractor).fit_required:
            out.append(task)
            continue
        if client is None:
            result = fit_group(task, train)
        else:
            key = f"fit-{task.name}-{uuid.uuid4().hex[:8]}"
            result = client.submit(fit_group, task, train, key=key, resources=resources).result()
        digest = hashlib.sha256(result["npz"]).hexdigest()
        rel = f"artifacts/{task.name}-{digest[:16]}.npz"
        path = store / rel
        write_atomic(path, result["npz"])
        task = dataclasses.replace(task, artifact=str(path.resolve()))
        fitted = _extractor(task)
        metas[task.name] = group_meta(
            task, fitted, {"path": rel, "sha256": digest, "fitted_on": result["fitted_on"], "split": "train"}
        )
        errors.extend(result["errors"])
        out.append(task)
    return tuple(out), errors


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


def _check_error_budget(config: ExtractConfig, store: Path, manifest: Manifest, fit_errors, results) -> None:
    n = len(fit_errors) + sum(len(r["errors"]) for r in results)
    budget = config.error_budget(len(manifest))
    if n > budget:
        last = next((r["errors"][-1] for r in reversed(results) if r["errors"]), None)
        example = f"; last: {last['key']} [{last['group']}/{last['stage']}] {last['message']}" if last else ""
        raise ExtractionError(
            f"{store}: {n} per-sample errors exceed max_errors={config.max_errors:g}{example}. "
            f"The {len(results)} finished shard(s) are kept: fix the inputs and re-run with --overwrite, "
            "or raise max_errors and re-run to resume"
        )


def run_extract(
    config: ExtractConfig, client=None, overwrite: bool = False, progress: bool = True
) -> ExtractSummary:
    """Extract every group of ``config`` into a store, on ``client`` (Dask) or serially."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    store = Path(config.store)
    manifest, plans, tasks, metas = prepare(config)
    identity = run_identity(config, manifest, tasks)
    state = store / STATE_DIR / "run.json"
    if store.exists() and any(store.iterdir()):
        if not (store / STORE_FILE).exists() and not state.exists() and not (store / "shards").exists():
            raise StoreError(
                f"{store}: exists, is not empty and is not a modalstore store; choose another path"
            )
        if (store / STORE_FILE).exists():
            done = json.loads((store / STORE_FILE).read_text()).get("identity")
            if done == identity and not overwrite:
                return ExtractSummary(
                    str(store), len(manifest), len(plans), 0, time.perf_counter() - t0, [], up_to_date=True
                )
            if not overwrite:
                raise StoreError(
                    f"{store}: a store made with another config or manifest already exists; "
                    "pass --overwrite to replace it"
                )
        elif state.exists() and not overwrite:
            if json.loads(state.read_text()).get("identity") != identity:
                raise StoreError(
                    f"{store}: holds an interrupted extraction with another config or manifest; "
                    "pass --overwrite to start over"
                )
        elif not overwrite:
            raise StoreError(f"{store}: store already exists; pass --overwrite to replace it")
    resources = _task_resources(config, client) if client is not None else None
    resuming = state.exists() and not overwrite
    if store.exists() and not resuming:
        for sub in ("shards", "catalog", "artifacts", "stats", STATE_DIR):
            shutil.rmtree(store / sub, ignore_errors=True)
        (store / STORE_FILE).unlink(missing_ok=True)
    write_atomic(state, json.dumps({"identity": identity}).encode())
    tasks, fit_errors = fit_groups(store, manifest, tasks, metas, client, resources)
    finished = {}
    if resuming:
        for leftover in (store / "shards").glob("*/.*.tmp-*"):  # a killed task's unfinished shard
            leftover.unlink(missing_ok=True)
        for plan in plans:
            part = load_part(store, plan, tasks)
            if part is not None:
                finished[plan.name] = part
        if progress:
            print(f"resuming: {len(finished)} of {len(plans)} shards already done", file=sys.stderr)
    results = list(finished.values())
    plans_todo = [p for p in plans if p.name not in finished]

    bar = tqdm(total=len(plans), initial=len(finished), desc="extract", unit="shard", disable=not progress)
    if client is None:
        try:
            for plan in plans_todo:
                results.append(extract_shard(plan, tasks, str(store.resolve())))
                bar.update(1)
                _check_error_budget(config, store, manifest, fit_errors, results)
        finally:
            _restore_threads()
    else:
        from distributed import as_completed

        run_id = uuid.uuid4().hex[:8]
        futures = [
            client.submit(
                extract_shard,
                plan,
                tasks,
                str(store.resolve()),
                key=f"extract-{plan.name}-{run_id}",
                resources=resources,
            )
            for plan in plans_todo
        ]
        try:
            for fut in as_completed(futures):
                results.append(fut.result())
                bar.update(1)
                _check_error_budget(config, store, manifest, fit_errors, results)
        except BaseException:
            client.cancel(futures)
            raise
    bar.close()
    order = {p.name: i for i, p in enumerate(plans)}
    results.sort(key=lambda r: order[r["shard"]])
    write_catalog(store, results, fit_errors)
    for task in tasks:  # train-split statistics per field, for the loader's normalisation
        fields = metas[task.name]["fields"]
        stats = {}
        for f in fields:
            merged = None
            for r in results:
                merged = merge_moments(merged, r["moments"].get(task.name, {}).get(f))
            if merged is not None:
                stats[f] = finalize(merged)
        if stats:
            save_stats(store / "stats" / f"{task.name}.npz", stats)
            metas[task.name]["stats"] = {"path": f"stats/{task.name}.npz", "split": "train"}
    errors = fit_errors + [e for r in results for e in r["errors"]]
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
            "identity": identity,
            "errors": len(errors),
        },
    )
    shutil.rmtree(store / STATE_DIR, ignore_errors=True)  # complete: store.json now says so
    return ExtractSummary(
        str(store),
        len(manifest),
        len(plans),
        len(errors),
        time.perf_counter() - t0,
        errors,
        resumed_shards=len(finished),
    )
