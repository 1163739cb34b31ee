"""`sessionrec`: the command-line interface, above everything else.

Each command parses flags into the typed settings (config.py) and calls the same functions the Dagster assets
call. Heavy libraries are imported inside the commands so that `sessionrec --help` stays instant.
Errors a user can act on (`SessionrecError`, bad flags) print one clear line and exit with status 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError as PydanticValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sessionrec.config import Settings, load_settings
from sessionrec.ops.errors import SessionrecError

app = typer.Typer(
    name="sessionrec",
    help="MLOps platform for session-based recommendation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=False)
err = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="settings file (TOML); default ./sessionrec.toml")]
ProfileOpt = Annotated[str | None, typer.Option("--profile", help="local | production")]
HomeOpt = Annotated[Path | None, typer.Option("--home", help="state directory (lake, Dagster, MLflow)")]


def _settings(config: Path | None, profile: str | None, home: Path | None, **sections: Any) -> Settings:
    overrides: dict[str, Any] = {k: v for k, v in sections.items() if v}
    if home is not None:
        overrides["home"] = home
    return load_settings(config, profile=profile, **overrides)  # type: ignore[arg-type]


def _prepare_dagster_home(settings: Settings) -> Path:
    """Dagster's storage stays under the project's state directory, with telemetry off."""
    home = settings.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    yaml = home / "dagster.yaml"
    if not yaml.exists():
        yaml.write_text("telemetry:\n  enabled: false\n")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


@app.command()
def generate(
    out: Annotated[Path, typer.Option("--out", help="output file: .parquet, .csv, .tsv or .jsonl")],
    events: Annotated[int, typer.Option("--events", min=1, max=50_000_000, help="number of events")] = 200_000,
    items: Annotated[int, typer.Option("--items", min=10)] = 5_000,
    days: Annotated[int, typer.Option("--days", min=1)] = 14,
    seed: Annotated[int, typer.Option("--seed")] = 42,
    no_session_ids: Annotated[bool, typer.Option("--no-session-ids", help="only user ids (sessions derived)")] = False,
    drift_start_day: Annotated[int | None, typer.Option("--drift-start-day", min=0)] = None,
    drift_new_items: Annotated[float, typer.Option("--drift-new-items", min=0, max=1)] = 0.0,
    drift_popularity_shift: Annotated[float, typer.Option("--drift-popularity-shift", min=0, max=1)] = 0.0,
) -> None:
    """Generate synthetic sessions (deterministic by seed) with learnable sequential structure."""
    from tqdm import tqdm

    from sessionrec.config import GeneratorConfig
    from sessionrec.ops.generate import generate_events, write_events

    cfg = GeneratorConfig(
        n_events=events, n_items=items, days=days, seed=seed, with_session_ids=not no_session_ids,
        drift_start_day=drift_start_day, drift_new_items=drift_new_items,
        drift_popularity_shift=drift_popularity_shift,
    )
    with tqdm(total=events, unit="ev", unit_scale=True, desc="generate", disable=not sys.stderr.isatty()) as bar:
        def progress(done: int, total: int) -> None:
            bar.update(done - bar.n)

        frame = generate_events(cfg, progress=progress)
    path = write_events(frame, out)
    console.print(f"wrote {frame.height:,} events, {frame['item_id'].n_unique():,} items to {path}")


@app.command()
def split(
    events: Annotated[list[Path], typer.Option("--events", help="event file(s) or directory")],
    out: Annotated[Path, typer.Option("--out", help="output directory")],
    fmt: Annotated[str, typer.Option("--format", help="auto or a format name (see `sessionrec formats`)")] = "auto",
    mapping: Annotated[str, typer.Option("--map", help="column mapping for generic files: item_id=col,...")] = "",
    encoding: Annotated[str, typer.Option("--encoding", help="text encoding of the source files")] = "utf-8",
    test_days: Annotated[float, typer.Option("--test-days", min=0.001)] = 1.0,
    valid_days: Annotated[float, typer.Option("--valid-days", min=0.001)] = 1.0,
    timeout_minutes: Annotated[float | None, typer.Option("--timeout-minutes", min=0.01)] = None,
    keep_repeats: Annotated[bool, typer.Option("--keep-repeats", help="keep consecutive repeats")] = False,
    min_item_support: Annotated[int | None, typer.Option("--min-item-support", min=1)] = None,
    min_session_length: Annotated[int | None, typer.Option("--min-session-length", min=1)] = None,
    max_session_length: Annotated[int | None, typer.Option("--max-session-length", min=2)] = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    home: HomeOpt = None,
) -> None:
    """Read events, validate, sessionize, clean and write train/train_tr/valid/test TSVs and stats.json."""
    from sessionrec.ops.pipeline import events_to_split

    base = _settings(config, profile, home)
    cleaning = base.cleaning.model_copy(
        update={k: v for k, v in {
            "drop_consecutive_repeats": False if keep_repeats else None,
            "min_item_support": min_item_support,
            "min_session_length": min_session_length,
            "max_session_length": max_session_length,
        }.items() if v is not None}
    )
    settings = base.model_copy(update={
        "cleaning": cleaning,
        "split": base.split.model_copy(update={"test_days": test_days, "valid_days": valid_days}),
        "sessions": base.sessions.model_copy(
            update={"timeout_minutes": timeout_minutes} if timeout_minutes else {}
        ),
    })
    outcome = events_to_split(events, fmt=fmt, mapping=mapping, settings=settings, out_dir=out, encoding=encoding)
    table = Table(title=f"split written to {out}")
    for column in ("file", "events", "sessions", "items"):
        table.add_column(column, justify="left" if column == "file" else "right")
    for name, counts in outcome.split.stats["files"].items():
        table.add_row(f"{name}.tsv", f"{counts['events']:,}", f"{counts['sessions']:,}", f"{counts['items']:,}")
    console.print(table)
    console.print(f"quarantined rows: {outcome.quarantine_counts or 'none'} → {outcome.quarantine_path}")


@app.command()
def run(
    input_paths: Annotated[list[Path] | None, typer.Option("--input", help="event file(s); default: synthetic")] = None,
    fmt: Annotated[str, typer.Option("--format")] = "auto",
    mapping: Annotated[str, typer.Option("--map")] = "",
    events: Annotated[int | None, typer.Option("--events", min=1_000, help="synthetic events to generate")] = None,
    models: Annotated[str | None, typer.Option("--models", help="comma-separated; default: settings")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda")] = None,
    serve_demo: Annotated[bool, typer.Option("--serve-demo/--no-serve-demo",
                                             help="end by serving the champion and sending a few requests")] = True,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    home: HomeOpt = None,
) -> None:
    """The main job: run the whole Dagster asset graph in-process (ingest → validate → sessionize → split →
    train → evaluate → register → promote) and print a summary."""
    from sessionrec.assets.runner import print_summary, run_main_job

    settings = _settings(config, profile, home)
    if events is not None:
        settings = settings.model_copy(update={"generator": settings.generator.model_copy(update={"n_events": events})})
    training = {k: v for k, v in {
        "models": tuple(m.strip() for m in models.split(",") if m.strip()) if models else None,
        "device": device,
    }.items() if v is not None}
    if training:  # validated like a config file: an unknown model name is a clear error before anything runs
        settings = Settings.model_validate({**settings.model_dump(), "training": {**settings.training.model_dump(),
                                                                                  **training}})
    _prepare_dagster_home(settings)
    outcome = run_main_job(settings, [str(p) for p in input_paths or []], fmt=fmt, mapping=mapping)
    print_summary(outcome, console)
    if not outcome.success:
        raise typer.Exit(1)
    if serve_demo and outcome.metadata.get("champion_model"):
        _demo_requests(settings, settings.outputs_dir / "split" / "test.tsv")


@app.command()
def evaluate(
    out: Annotated[Path, typer.Option("--out", help="results JSON")] = Path("results.json"),
    train: Annotated[Path | None, typer.Option("--train", help="train TSV (SessionId ItemId Time)")] = None,
    test: Annotated[Path | None, typer.Option("--test", help="test TSV (SessionId ItemId Time)")] = None,
    events: Annotated[list[Path] | None, typer.Option("--events", help="raw events instead: split on the fly")] = None,
    fmt: Annotated[str, typer.Option("--format")] = "auto",
    test_days: Annotated[float, typer.Option("--test-days", min=0.001)] = 1.0,
    models: Annotated[str, typer.Option("--models", help="comma-separated model names")] = (
        "pop,sknn,vsknn,stan,vstan,gru4rec,sasrec,hybrid"
    ),
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
    seed: Annotated[int, typer.Option("--seed")] = 42,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    home: HomeOpt = None,
) -> None:
    """Train each model and evaluate it with the exact next-item protocol (full catalogue, pessimistic ties)."""
    import json

    from sessionrec.ops.experiment import run_evaluation
    from sessionrec.ops.sessiondata import read_split_tsv

    names = [m.strip() for m in models.split(",") if m.strip()]
    if events:
        if train or test:
            raise typer.BadParameter("give either --train/--test or --events, not both")
        import tempfile

        from sessionrec.ops.pipeline import events_to_split

        settings = _settings(config, profile, home)
        settings = settings.model_copy(update={"split": settings.split.model_copy(update={"test_days": test_days})})
        split_dir = Path(tempfile.mkdtemp(prefix="sessionrec-split-"))
        outcome = events_to_split(events, fmt=fmt, mapping="", settings=settings, out_dir=split_dir)
        train, test = outcome.paths["train"], outcome.paths["test"]
        console.print(f"split written to {split_dir}")
    if train is None or test is None:
        raise typer.BadParameter("give --train and --test (TSV files of `sessionrec split`), or --events")
    results = run_evaluation(read_split_tsv(train), read_split_tsv(test), names, device=device, seed=seed,
                             progress=lambda message: err.print(f"[dim]{message}[/]"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    table = Table(title=f"next-item evaluation: {results['dataset']['test']['events']:,} test events, "
                        f"{len(results['models'])} models (full catalogue of {results['dataset']['catalogue_items']:,})")
    for column in ("model", "recall@20", "mrr@20", "ndcg@20", "recall@10", "mrr@10", "coverage@20", "train s",
                   "predict s", "device"):
        table.add_column(column, justify="left" if column in ("model", "device") else "right")
    for name, r in sorted(results["models"].items(), key=lambda kv: -kv[1]["mrr@20"]):
        table.add_row(name, *(f"{r[k]:.4f}" for k in ("recall@20", "mrr@20", "ndcg@20", "recall@10", "mrr@10",
                                                      "coverage@20")),
                      f"{r['train_seconds']:.1f}", f"{r['predict_seconds']:.1f}", str(r["device"]))
    console.print(table)
    console.print(f"{results['models'][names[0]]['n_predictions']:,} predictions per model; results in {out}")


models_app = typer.Typer(help="Release management: the registry's versions and the champion alias.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")


def _registry(config: Path | None, profile: str | None, home: Path | None):  # noqa: ANN202 - lazy import
    from sessionrec.integrations.mlflow_registry import Registry

    settings = _settings(config, profile, home)
    return Registry(settings.tracking_uri, settings.tracking.registered_model)


@models_app.command("list")
def models_list(config: ConfigOpt = None, profile: ProfileOpt = None, home: HomeOpt = None) -> None:
    """Registered versions with their aliases, test metrics and gate verdicts."""
    versions = _registry(config, profile, home).list_versions()
    if not versions:
        console.print("no registered version yet: run `make demo` or `sessionrec run` first")
        return
    table = Table(title="registered versions")
    for column in ("version", "aliases", "model", "recall@20", "mrr@20", "gate", "promoted by", "reason", "created"):
        table.add_column(column)
    for v in versions:
        table.add_row(
            str(v.version), ", ".join(v.aliases), v.tags.get("model_name", ""),
            f"{v.metrics.get('recall_at_20', float('nan')):.4f}", f"{v.metrics.get('mrr_at_20', float('nan')):.4f}",
            {None: "-", True: "passed", False: "refused"}[v.gate_passed], v.promoted_by or "",
            (v.promotion_reason or "")[:40], v.created.strftime("%Y-%m-%d %H:%M"),
        )
    console.print(table)


@models_app.command("promote")
def models_promote(
    version: Annotated[int, typer.Option("--version", min=1, help="registered version to make champion")],
    reason: Annotated[str, typer.Option("--reason", help="why (recorded on the version)")] = "manual promotion",
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    home: HomeOpt = None,
) -> None:
    """Move the `champion` alias to a version (recorded: who, when, why)."""
    info = _registry(config, profile, home).promote(version, reason)
    console.print(f"version {info.version} is champion (was {info.previous_champion or 'none'})")


@models_app.command("rollback")
def models_rollback(
    reason: Annotated[str, typer.Option("--reason")] = "manual rollback",
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    home: HomeOpt = None,
) -> None:
    """Move `champion` back to the previous champion."""
    info = _registry(config, profile, home).rollback(reason)
    console.print(f"version {info.version} is champion again")


@app.command("mlflow-ui")
def mlflow_ui(
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 5000,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    home: HomeOpt = None,
) -> None:
    """Start the MLflow UI on the project's tracking store and registry."""
    import subprocess

    from sessionrec.integrations.mlflow_tracking import prepare_store, resolve_store_uri

    settings = _settings(config, profile, home)
    uri = resolve_store_uri(settings.tracking_uri)
    prepare_store(uri)
    settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"MLflow UI on http://127.0.0.1:{port} (store {uri})")
    subprocess.run(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--default-artifact-root",
         str(settings.artifacts_dir), "--host", "127.0.0.1", "--port", str(port)],
        check=False,
    )


@app.command()
def serve(
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 3000,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, max=64, help="server processes (default: serving.workers)")
    ] = None,
    config: ConfigOpt = None,
    profile: ProfileOpt = None,
    home: HomeOpt = None,
) -> None:
    """Serve the registry's champion (and challenger) over HTTP: POST /recommend, /events, /feedback; OpenAPI at
    /openapi.json. Keys: SESSIONREC_API_KEYS (header X-API-Key); admin token: SESSIONREC_ADMIN_TOKEN."""
    from sessionrec.serving.server import serve as run_server

    run_server(_settings(config, profile, home, serving={"workers": workers} if workers else None), port)


def _demo_requests(settings: Settings, test_split: Path, n_sessions: int = 3) -> None:
    """Start the real server on a free loopback port, send a few requests from test sessions, print the answers."""
    import secrets
    import socket
    import subprocess
    import tempfile
    import time

    import httpx
    import polars as pl

    from sessionrec.serving.server import serve_command, serve_environment

    key = secrets.token_urlsafe(16)
    # One worker: a few requests need no second process, and the first /readyz then speaks for the whole server.
    serving = settings.serving.model_copy(update={"api_keys": (key,), "workers": 1})
    settings = settings.model_copy(update={"serving": serving})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sessions = (pl.read_csv(test_split, separator="\t", schema_overrides={"SessionId": pl.String, "ItemId": pl.String})
                .group_by("SessionId", maintain_order=True).agg("ItemId").head(n_sessions).rows())
    with tempfile.TemporaryDirectory(prefix="sessionrec-demo-") as tmp:
        env = serve_environment(settings, Path(tmp) / "settings.json")
        server = subprocess.Popen(serve_command(settings, port), env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            else:
                err.print("the demo server did not become ready within 120 s; skipping the demo requests")
                return
            console.print(f"[bold]serving[/] on {base} (OpenAPI at {base}/openapi.json): a few requests")
            for session_id, items in sessions:
                body = {"session_id": f"demo-{session_id}", "events": [{"item_id": i} for i in items[:-1]], "k": 5}
                answer = httpx.post(f"{base}/recommend", json=body, headers={"X-API-Key": key}, timeout=10).json()
                top = ", ".join(i["item_id"] for i in answer.get("items", []))
                console.print(escape(
                    f"  session {session_id} after {items[:-1][-3:]} → [{top}] (next was {items[-1]}; model "
                    f"{answer['model']['name']} v{answer['model']['version']}, {answer['variant']}, "
                    f"fallback {answer['fallback']}, {answer['took_ms']:.1f} ms)"))
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()


@app.command()
def formats() -> None:
    """List the input formats `--format` accepts."""
    from sessionrec.ops.readers import FORMATS

    console.print("auto (detect), " + ", ".join(FORMATS))


def main() -> None:
    """Console entry point: user errors become one clear line and exit status 2, never a traceback."""
    for variable, value in (("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"), ("DO_NOT_TRACK", "1"),
                            ("GX_ANALYTICS_ENABLED", "false"), ("BENTOML_DO_NOT_TRACK", "True"),
                            ("DAGSTER_DISABLE_TELEMETRY", "1")):
        os.environ.setdefault(variable, value)
    try:
        app()
    except SessionrecError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)
    except (FileNotFoundError, PydanticValidationError) as exc:
        err.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
