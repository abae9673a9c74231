"""The ``modalstore`` command line: the edge of the project, importing all three packages.

Each subcommand is a thin wrapper: parse arguments, call one library function, print.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__version__ = "0.1.0"

EPILOG = """\
typical flow:
  modalstore demo-data data/demo --samples 1600 --seed 0
  modalstore extract configs/extract_demo.yaml
  modalstore inspect stores/demo && modalstore verify stores/demo
  modalstore gc stores/demo            # list group versions no config uses; --yes deletes
  modalstore train configs/train_demo.yaml
  modalstore evaluate runs/demo
  modalstore report runs/demo

Run 'modalstore COMMAND --help' for the options of a command.
"""


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from pipelines.demo_data import make_demo_dataset

    manifest = make_demo_dataset(
        args.out,
        n_samples=args.samples,
        seed=args.seed,
        missing_rate=args.missing_rate,
        progress=not args.quiet,
    )
    print(f"wrote {args.samples} samples; manifest: {manifest}")
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from pipelines.cluster import connect, local_client, shutdown
    from pipelines.extract import load_extract_config, prepare, run_extract

    overrides = list(args.set or [])
    if args.max_errors is not None:
        overrides.append(f"max_errors={args.max_errors}")
    config = load_extract_config(args.config, overrides)
    if args.dry_run:
        manifest, plans, tasks, group_meta = prepare(config, progress=True)
        print(f"manifest {manifest.path}: {len(manifest)} samples, modalities {manifest.modalities}")
        print(f"{len(plans)} shards of up to {config.samples_per_shard} samples")
        for name, meta in group_meta.items():
            if meta["fields"] is None:
                fields = "(fields known after fitting on the train split)"
            else:
                fields = ", ".join(f"{k} {v['dtype']}{tuple(v['shape'])}" for k, v in meta["fields"].items())
            print(f"  group {name}: {meta['extractor']} v{meta['extractor_version']} -> {fields}")
        return 0
    client = None
    try:
        if args.scheduler:
            client = connect(args.scheduler)
        elif not args.serial:
            client = local_client(args.workers)
        summary = run_extract(config, client=client, overwrite=args.overwrite, progress=not args.quiet)
    finally:
        if client is not None:
            shutdown(client)
    print(summary)
    for row in summary.error_rows[:10]:
        print(f"  error: {row['key']} [{row['group']}/{row['stage']}] {row['error_type']}: {row['message']}")
    if len(summary.error_rows) > 10:
        print(f"  ... {len(summary.error_rows) - 10} more in {summary.store}/catalog/errors.parquet")
    return 1 if summary.failed_shards else 0


def _cmd_train(args: argparse.Namespace) -> int:
    from fusion.train import load_train_config, train_all

    overrides = list(args.set or [])
    if args.seeds is not None:
        overrides.append(f"seeds={args.seeds}")
    config = load_train_config(args.config, overrides)
    runs = train_all(config, progress=not args.quiet, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line per run, not per rank
        for run in runs:
            print(f"trained {run}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fusion.evaluate import evaluate_all, evaluate_run

    path = Path(args.run)
    robust = not args.no_robustness
    if (path / "checkpoint.pt").exists():
        results = [evaluate_run(path, split=args.split, robustness=robust)]
    else:
        results = evaluate_all(path, split=args.split, robustness=robust)
    for m in results:
        print(
            f"{m['run']:<24} acc {m['accuracy']:.3f}  macro-recall {m['macro_recall']:.3f}  "
            f"macro-F1 {m['macro_f1']:.3f}  (n={m['n']}, {args.split})"
        )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from fusion.report import write_report

    print(write_report(*args.runs_dirs, out_dir=args.out))
    return 0


def _cmd_av_digits(args: argparse.Namespace) -> int:
    from pipelines.datasets import default_cache_dir, download_fsdd, download_mnist, make_av_digits

    fsdd, mnist = args.fsdd or "../shared/data/fsdd", args.mnist or "../shared/data/mnist-t10k"
    if args.download:
        if args.fsdd or args.mnist:
            print("error: --download fetches the sources; drop --fsdd/--mnist", file=sys.stderr)
            return 2
        cache = args.cache or default_cache_dir()
        fsdd = download_fsdd(cache, args.fsdd_url, progress=not args.quiet)
        mnist = download_mnist(cache, args.mnist_url, progress=not args.quiet)
    manifest = make_av_digits(
        args.out,
        fsdd,
        mnist,
        test_speaker=args.test_speaker,
        val_fraction=args.val_fraction,
        max_per_digit=args.max_per_digit,
        image_pca_energy=args.image_pca_energy,
        audio_snr_db=args.audio_snr_db,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(f"wrote av-digits; manifest: {manifest}")
    return 0


def _cmd_extractors(args: argparse.Namespace) -> int:
    from features import get_extractor, list_extractors
    from features.registry import describe_params

    rows = []
    for name in list_extractors():
        cls = get_extractor(name)
        rows.append(
            {
                "name": name,
                "modality": cls.modality,
                "version": cls.version,
                "description": cls.description,
                "params": {p: d for p, _, d in describe_params(cls)},
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for r in rows:
        print(f"{r['name']} ({r['modality']}, v{r['version']}): {r['description']}")
        for p, d in r["params"].items():
            print(f"    {p} = {d!r}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from pipelines.inspect import format_inspect, inspect_store

    info = inspect_store(args.store)
    print(json.dumps(info, indent=2, default=str) if args.json else format_inspect(info))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from pipelines.verify import verify_store

    report = verify_store(
        args.store, check_keys=not args.no_keys, progress=not args.quiet, workers=args.workers
    )
    for problem in report.problems:
        print(problem)
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_get(args: argparse.Namespace) -> int:
    from pipelines.lookup import format_sample, get_sample, sample_to_json, save_npz
    from pipelines.store import open_store

    store = open_store(args.store)
    sample = get_sample(store, args.key, groups=args.group)
    saved = save_npz(sample, args.out) if args.out else None
    if args.json:
        print(json.dumps(sample_to_json(sample)))
    else:
        print(format_sample(sample, store.classes))
    if saved is not None:  # on stderr with --json, so stdout stays one JSON document
        print(
            f"saved {len(saved)} array(s) to {args.out}: {', '.join(saved)}",
            file=sys.stderr if args.json else sys.stdout,
        )
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    from pipelines.gc import plan_gc, run_gc
    from pipelines.inspect import human_bytes

    plan = plan_gc(args.store, args.config or [])
    kept = ", ".join(f"{g} {' '.join(vs)}" for g, vs in sorted(plan.keep.items()))
    print(f"keeping versions: {kept}")
    if plan.empty:
        print(f"{plan.store}: nothing to remove")
        return 0
    verb = "removing" if args.yes else "would remove"
    for g, v in plan.versions:
        print(f"{verb} version {g} {v}")
    for rel in plan.paths:
        print(f"  {rel}")
    print(f"{verb} {len(plan.paths)} path(s), {human_bytes(plan.bytes)} freed")
    if not args.yes:
        print("nothing deleted (dry run); run again with --yes to delete")
        return 0
    run_gc(plan)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modalstore",
        description="Extract image/audio/video/text features into WebDataset shards, stream them, "
        "and train multimodal fusion models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"modalstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, func, description: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description or help)
        p.set_defaults(func=func)
        return p

    p = add(
        "demo-data",
        "write the synthetic multimodal demo dataset (PNG, WAV, MP4, captions, manifest)",
        _cmd_demo_data,
        "Write a synthetic 16-class dataset where each modality carries one bit of the label "
        "(label = 8*image_bit + 4*audio_bit + 2*video_bit + text_bit), so only fusion can solve it.",
    )
    p.add_argument("out", help="output folder (created)")
    p.add_argument("--samples", type=int, default=1600, help="number of samples (default 1600)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default 0)")
    p.add_argument(
        "--missing-rate", type=float, default=0.0, help="fraction of media cells left empty (default 0)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add(
        "extract",
        "extract features into a store (Dask: local cluster, or --scheduler)",
        _cmd_extract,
        "Read an extraction config (manifest, store, samples_per_shard, groups of extractor + params), "
        "validate the manifest, then run one task per shard on Dask and write WebDataset shards, "
        "the Parquet catalog and store.json.",
    )
    p.add_argument("config", help="extraction YAML config (see configs/extract_demo.yaml)")
    p.add_argument("--scheduler", help="address of an existing Dask scheduler, e.g. tcp://10.0.0.5:8786")
    p.add_argument("--workers", type=int, default=None, help="local worker processes (default: one per core)")
    p.add_argument("--serial", action="store_true", help="no Dask: run every shard in this process")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at the same path")
    p.add_argument(
        "--dry-run", action="store_true", help="validate config and manifest, print the plan, stop"
    )
    p.add_argument(
        "--max-errors",
        type=float,
        default=None,
        metavar="N",
        help="abort when more than N samples fail (N < 1: a fraction of all samples); finished shards are kept",
    )
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. samples_per_shard=64"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add(
        "train",
        "train fusion models and unimodal baselines on a store",
        _cmd_train,
        'Train every model listed in the config ("unimodal" expands to one baseline per group); '
        "each run writes config.yaml, last.pt (every epoch, for --resume), checkpoint.pt (best "
        "validation epoch), log.jsonl and steps.jsonl under runs_dir/<run>/.",
    )
    p.add_argument("config", help="training YAML config (see configs/train_demo.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. epochs=5")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue each run from its last.pt (the last finished epoch); finished runs are skipped",
    )
    p.add_argument(
        "--seeds", type=int, metavar="N", help="train every run with N seeds (mean ± std in the report)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add(
        "evaluate",
        "accuracy, precision/recall/F1, confusion matrix and missing-modality robustness into metrics.json",
        _cmd_evaluate,
    )
    p.add_argument("run", help="a run folder (with checkpoint.pt) or a folder of runs")
    p.add_argument(
        "--split", default="test", choices=["train", "val", "test"], help="split to evaluate (default test)"
    )
    p.add_argument("--no-robustness", action="store_true", help="skip the masked/noisy-modality evaluations")

    p = add("report", "write report.md comparing every evaluated run of one or more folders", _cmd_report)
    p.add_argument("runs_dirs", nargs="+", metavar="RUNS_DIR", help="folder(s) of evaluated runs")
    p.add_argument("--out", help="folder for report.md and its plots (default: the first RUNS_DIR)")

    p = sub.add_parser(
        "datasets", help="build a real-data dataset (media + manifest) from downloaded sources"
    )
    recipes = p.add_subparsers(dest="recipe", required=True, metavar="RECIPE")
    p = recipes.add_parser(
        "av-digits",
        help="audio-visual digits: FSDD spoken digits paired with MNIST images by label",
        description="Pair every FSDD recording with an MNIST image of the same digit (disjoint image "
        "pools per split); test = FSDD recordings 0-4, or one held-out speaker. Optional AV-MNIST-style "
        "degradation: image PCA energy removal, audio noise. Writes images/, audio/, manifest.csv, "
        "dataset.json.",
    )
    p.set_defaults(func=_cmd_av_digits)
    p.add_argument("out", help="output folder (created)")
    p.add_argument("--fsdd", help="FSDD folder (with recordings/); default ../shared/data/fsdd")
    p.add_argument("--mnist", help="folder of MNIST IDX .gz files; default ../shared/data/mnist-t10k")
    p.add_argument(
        "--download",
        action="store_true",
        help="fetch FSDD and MNIST into --cache (reused when there) instead of --fsdd/--mnist",
    )
    p.add_argument("--cache", help="download folder (default $MODALSTORE_CACHE or ~/.cache/modalstore)")
    p.add_argument(
        "--fsdd-url",
        help="FSDD .tar.gz/.zip archive URL (default $MODALSTORE_FSDD_URL or the v1.0.10 release)",
    )
    p.add_argument(
        "--mnist-url",
        help="folder URL of t10k-*-ubyte.gz (default $MODALSTORE_MNIST_URL or torchvision's mirror)",
    )
    p.add_argument("--test-speaker", help="hold out this speaker as the test split (default: recordings 0-4)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="of the non-test recordings (default 0.1)")
    p.add_argument("--max-per-digit", type=int, help="at most N recordings per digit and split")
    p.add_argument(
        "--image-pca-energy", type=float, default=0.0, help="PCA energy removed from images (AV-MNIST: 0.75)"
    )
    p.add_argument("--audio-snr-db", type=float, help="mix white noise into the audio at this SNR")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add("extractors", "list every extractor with its parameters and defaults", _cmd_extractors)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add(
        "inspect",
        "summarise a store: groups, fields, splits, sizes, presence and errors",
        _cmd_inspect,
        "Summarise a store from store.json and its Parquet catalog (never reading the shards): "
        "each group's extractor, version, parameters and fields; samples, shards and present samples "
        "per split; shard bytes per group; per-sample errors by group, stage and error type.",
    )
    p.add_argument("store", help="store folder (the one holding store.json)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add(
        "verify",
        "check every shard's size, sha256 and keys against the catalog (exit 1 on problems)",
        _cmd_verify,
        "Re-hash every shard file and compare size and sha256 with catalog/shards.parquet; read each "
        "tar's headers (nothing is extracted) and check that every group's shard holds the catalog's "
        "keys in index order and that catalog/members.parquet matches the tar. Prints one line per "
        "problem (kind: group/shard: detail), then a summary. Exit status: 0 clean, 1 problems found, "
        "2 usage error or no store.",
    )
    p.add_argument("store", help="store folder (the one holding store.json)")
    p.add_argument(
        "--no-keys", action="store_true", help="check sizes and sha256 only (faster: no tar parsing)"
    )
    p.add_argument("--workers", type=int, default=1, help="shards checked in parallel threads (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = add(
        "get",
        "print one sample's metadata and arrays, read by key without scanning shards",
        _cmd_get,
        "Look a key up in the catalog and read only its members from each group's shard (seek + read "
        "at the offsets in catalog/members.parquet). Prints key, label, split, shard and per field its "
        "dtype, shape, min, mean and max.",
    )
    p.add_argument("store", help="store folder (the one holding store.json)")
    p.add_argument("key", help="sample key, as in the manifest")
    p.add_argument(
        "--group", action="append", metavar="G", help="only this group (repeat for several; default: all)"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print everything as JSON, arrays as nested lists with dtype and shape",
    )
    p.add_argument("--out", metavar="FILE.npz", help="also save the arrays to FILE.npz as 'group.field'")

    p = add(
        "gc",
        "list, then remove, group versions no config refers to (dry run unless --yes)",
        _cmd_gc,
        "Every extract keeps each group's output under a version (a content hash of extractor, "
        "parameters, fitted artifact and manifest); changed configs leave older versions beside the "
        "active ones. gc keeps the active version of every group and those the --config files would "
        "produce, and lists everything else: other versions' shards and records, unused fitted "
        "artifacts, temporary files of interrupted writes. Nothing is deleted without --yes.",
    )
    p.add_argument("store", help="store folder (the one holding store.json)")
    p.add_argument(
        "--config",
        action="append",
        metavar="CFG",
        help="also keep the versions this extraction config produces (repeat for several)",
    )
    p.add_argument("--yes", action="store_true", help="delete what is listed (default: only list it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from features.errors import ModalstoreError

    try:
        return args.func(args)
    except ModalstoreError as exc:
        print(f"modalstore {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"modalstore {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
