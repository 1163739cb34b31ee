"""Training-speed benchmark of the neural session models (GRU4Rec, SASRec).

Per model: training events/s (next-item examples trained per second of training, validation excluded), time
to reach the validation optimum, peak memory (RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), the
final recall@20 / MRR@20 on the test split (exact protocol of `ops.evaluation`), and the device. Prints a
table and writes benchmarks/results/train_speed.json.

Each model runs in its own child process, so that its peak memory is its own and a crash or a hang in one
model is reported without losing the others. Training stops after ``--max-seconds`` (checked during the
epoch); evaluation can be capped with ``--test-sessions``.

Data: the YOOCHOOSE 100k slice of session-rec (default; train_full -> test), or ``--synthetic N``: N events of
the project's generator, the sessions ending on the last day being the test split. Training runs on the train
split minus its last day, which is the validation split for early stopping; with refit (the default) the
model is then retrained on the whole train split for the best number of epochs.

    .venv/bin/python benchmarks/train_speed.py                          # YOOCHOOSE on this machine
    .venv/bin/python benchmarks/train_speed.py --synthetic 10000000 --device cuda --max-seconds 300
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import platform
import queue
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "yoochoose" / "session-rec"
TRAIN_FILE, TEST_FILE = "yoochoose-clicks-100k_train_full.txt", "yoochoose-clicks-100k_test.txt"
MODELS = ("gru4rec", "sasrec")


class BenchmarkError(Exception):
    """Bad arguments or missing inputs: printed without a traceback."""


def synthetic_split(n_events: int, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Generator events as ``SessionId ItemId Time`` frames; sessions ending in the last day are the test."""
    from sessionrec.config import GeneratorConfig
    from sessionrec.ops.generate import generate_events

    events = generate_events(GeneratorConfig(n_events=n_events, seed=seed))
    frame = events.select(
        pl.col("session_id").alias("SessionId"),
        pl.col("item_id").alias("ItemId"),
        (pl.col("timestamp").dt.epoch("us") / 1e6).alias("Time"),
    )
    if frame["SessionId"].null_count():
        raise BenchmarkError("the generator produced events without session ids; keep with_session_ids on")
    ends = frame.group_by("SessionId").agg(pl.col("Time").max().alias("_end"))
    frame = frame.join(ends, on="SessionId", maintain_order="left")
    is_test = pl.col("_end") > pl.col("Time").max() - 86_400.0
    return frame.filter(~is_test).drop("_end"), frame.filter(is_test).drop("_end")


def yoochoose_split(directory: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    from sessionrec.ops.sessiondata import read_split_tsv

    missing = [name for name in (TRAIN_FILE, TEST_FILE) if not (directory / name).is_file()]
    if missing:
        raise BenchmarkError(
            f"{directory} lacks {missing}; pass --data-dir (the session-rec folder) or --synthetic N"
        )
    return read_split_tsv(directory / TRAIN_FILE), read_split_tsv(directory / TEST_FILE)


def model_config(name: str, args: argparse.Namespace) -> Any:
    from sessionrec.ops.models.registry import model_class

    overrides: dict[str, Any] = {
        "device": args.device,
        "seed": args.seed,
        "refit": args.refit,
        "progress": not args.no_progress,
        "max_seconds": args.max_seconds,
        "cpu_threads": args.cpu_threads,
    }
    if args.epochs:
        overrides["max_epochs"] = args.epochs
    if args.batch_size:
        overrides["batch_size"] = overrides["cuda_batch_size"] = args.batch_size
    return model_class(name).config_class(**overrides)


def run_model(name: str, args: argparse.Namespace, data: dict[str, Any], results: "queue.Queue") -> None:
    """Child process: fit, evaluate, measure; puts one result dict on ``results``."""
    try:
        results.put(_measure(name, args, data))
    except BaseException as exc:  # noqa: BLE001 - the parent reports it
        results.put({"model": name, "error": f"{type(exc).__name__}: {exc}"})


def _measure(name: str, args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    import torch

    from sessionrec.ops.device import peak_memory_bytes, resolve_device
    from sessionrec.ops.evaluation import evaluate
    from sessionrec.ops.models.registry import model_class

    config = model_config(name, args)
    device = resolve_device(config.device, config.cpu_threads)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = model_class(name)(config)
    started = time.perf_counter()
    report = model.fit(data["train_tr"], data["valid"])
    wall = time.perf_counter() - started
    search = [e for e in report.epochs if not e["refit"]]
    to_best = sum(e["train_seconds"] + e["valid_seconds"] for e in search[: report.best_epoch or 0])
    started = time.perf_counter()
    metrics = evaluate(model, data["test"], data["train"])
    return {
        "model": name,
        "device": report.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "events_per_second": report.events_per_second,
        "epochs": len(search),
        "refit_epochs": len(report.epochs) - len(search),
        "best_epoch": report.best_epoch,
        "best_valid_mrr@20": report.best_valid_mrr,
        "seconds_to_best": to_best,
        "train_seconds": report.train_seconds,
        "fit_wall_seconds": wall,
        "out_of_time": any(e.get("out_of_time") for e in report.epochs),
        "peak_memory_bytes": peak_memory_bytes(device),
        "test_recall@20": metrics["recall@20"],
        "test_mrr@20": metrics["mrr@20"],
        "test_predictions": metrics["n_predictions"],
        "eval_seconds": time.perf_counter() - started,
        "config": dataclasses.asdict(config),
        "epoch_log": report.epochs,
    }


def load_data(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    from sessionrec.ops.evaluation import carve_validation
    from sessionrec.ops.sessiondata import ItemIndex, SessionData
    from sessionrec.ops.training import last_sessions

    started = time.perf_counter()
    if args.synthetic:
        train_frame, test_frame = synthetic_split(args.synthetic, args.seed)
        source = f"synthetic ({args.synthetic} events, seed {args.seed})"
    else:
        train_frame, test_frame = yoochoose_split(args.data_dir)
        source = f"YOOCHOOSE session-rec 100k ({args.data_dir})"
    index = ItemIndex.from_items(train_frame["ItemId"])
    train, _ = SessionData.from_frame(train_frame, index)
    test, unknown = SessionData.from_frame(test_frame, index)
    if args.test_sessions:
        test = last_sessions(test, args.test_sessions)
    train_tr, valid = carve_validation(train)
    data = {"train": train, "train_tr": train_tr, "valid": valid, "test": test}
    info = {
        "source": source,
        "catalogue_items": len(index),
        **{f"{k}_events": v.n_events for k, v in data.items()},
        "test_unknown_item_events_removed": unknown,
        "prepare_seconds": time.perf_counter() - started,
    }
    return data, info


def run(args: argparse.Namespace) -> dict[str, Any]:
    from sessionrec.ops.device import resolve_device
    from sessionrec.ops.errors import SessionrecError

    try:
        resolve_device(args.device)  # a missing GPU fails here, before minutes of data preparation
    except SessionrecError as exc:
        raise BenchmarkError(str(exc)) from exc
    data, info = load_data(args)
    print(
        f"data: {info['source']}: train {info['train_events']} events (train_tr {info['train_tr_events']}, "
        f"valid {info['valid_events']}), test {info['test_events']}, {info['catalogue_items']} items"
    )
    context = multiprocessing.get_context("spawn")
    results = [_in_child(context, name, args, data) for name in args.models]
    import torch

    return {
        "dataset": info,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
        },
        "results": results,
    }


def _in_child(context: Any, name: str, args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    """Runs one model in a fresh process; a child that dies or overruns becomes an error entry."""
    channel = context.Queue()
    child = context.Process(target=run_model, args=(name, args, data, channel))
    child.start()
    limit = args.max_seconds * 2 + 900  # the training budget, evaluation and start-up
    deadline = time.monotonic() + limit
    while True:
        try:
            result = channel.get(timeout=5)
            break
        except queue.Empty:
            if not child.is_alive():
                result = {"model": name, "error": f"the process died (exit code {child.exitcode})"}
                break
            if time.monotonic() > deadline:
                child.kill()
                result = {"model": name, "error": f"no result within {limit:.0f}s; killed"}
                break
    child.join()
    return result


def table(report: dict[str, Any]) -> str:
    header = ("model", "device", "events/s", "epochs", "best", "to best s", "train s", "peak MB", "R@20", "MRR@20")
    rows = [header]
    for r in report["results"]:
        if "error" in r:
            rows.append((r["model"], "error: " + r["error"], *[""] * 8))
            continue
        rows.append((
            r["model"], r["device"], f"{r['events_per_second']:,.0f}", f"{r['epochs']}+{r['refit_epochs']}",
            str(r["best_epoch"]), f"{r['seconds_to_best']:.1f}", f"{r['train_seconds']:.1f}",
            f"{r['peak_memory_bytes'] / 2**20:,.0f}", f"{r['test_recall@20']:.4f}", f"{r['test_mrr@20']:.4f}",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--synthetic", type=int, metavar="N", help="N generated events instead of YOOCHOOSE")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="folder of the session-rec 100k files")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="training budget per model (seconds)")
    parser.add_argument("--epochs", type=int, help="max_epochs instead of each model's default")
    parser.add_argument("--batch-size", type=int, help="batch size on the chosen device instead of the default")
    parser.add_argument("--no-refit", dest="refit", action="store_false", help="no retraining on train + valid")
    parser.add_argument("--test-sessions", type=int, help="evaluate on the newest N test sessions only")
    parser.add_argument("--cpu-threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train_speed.json")
    args = parser.parse_args(argv)
    if args.synthetic is not None and args.synthetic < 1_000:
        parser.error("--synthetic needs at least 1000 events")
    if args.max_seconds is not None and args.max_seconds <= 0:
        parser.error("--max-seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=_json_default))
    print(f"written to {args.out}")
    return 1 if any("error" in r for r in report["results"]) else 0


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
