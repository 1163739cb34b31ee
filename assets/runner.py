"""Run the main job in-process (what `sessionrec run` and `make demo` do) and summarise it for a person.

The run is recorded in the project's Dagster instance (DAGSTER_HOME under the state directory), so that
`make ui` shows it afterwards with all its metadata and lineage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

from sessionrec.assets.definitions import build_definitions
from sessionrec.assets.resources import SessionrecResource
from sessionrec.config import Settings


@dataclass
class RunOutcome:
    success: bool
    run_id: str
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)  # asset name -> metadata values
    checks: dict[str, tuple[bool, str]] = field(default_factory=dict)  # check name -> (passed, description)
    failed_steps: list[str] = field(default_factory=list)
    settings: Settings | None = None


def _plain(value: Any) -> Any:
    return getattr(value, "value", value)


def run_main_job(settings: Settings, paths: Sequence[str], *, fmt: str = "auto", mapping: str = "") -> RunOutcome:
    defs = build_definitions(SessionrecResource(settings_json=settings.model_dump_json()))
    job = defs.resolve_job_def("main")
    run_config = {
        "ops": {"raw_events": {"config": {"paths": list(paths), "format": fmt, "mapping": mapping}}},
        # Step bookkeeping stays in the run's event log (see it in `make ui`); the console gets INFO and up.
        "loggers": {"console": {"config": {"log_level": "INFO"}}},
    }
    result = job.execute_in_process(run_config=run_config, instance=dg.DagsterInstance.get(), raise_on_error=False)
    outcome = RunOutcome(success=result.success, run_id=result.run_id, settings=settings)
    for event in result.get_asset_materialization_events():
        mat = event.step_materialization_data.materialization
        outcome.metadata[mat.asset_key.to_user_string()] = {k: _plain(v) for k, v in mat.metadata.items()}
    for evaluation in result.get_asset_check_evaluations():
        outcome.checks[evaluation.check_name] = (evaluation.passed, evaluation.description or "")
    outcome.failed_steps = [e.step_key for e in result.all_events if e.is_step_failure and e.step_key]
    return outcome


def print_summary(outcome: RunOutcome, console: Console) -> None:
    """Events in, quarantine by reason, sessions, items, split sizes, and where everything is."""
    md = outcome.metadata
    raw, lake, sess, split = (md.get(k, {}) for k in ("raw_events", "lake_events", "sessions", "session_split"))
    table = Table(title="sessionrec main job", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("events read", raw.get("rows_in")),
        ("events valid", raw.get("events_valid")),
        ("rows quarantined", raw.get("rows_quarantined")),
        ("events new in lake", lake.get("events_new")),
        ("events already in lake", lake.get("events_already_present")),
        ("lake events total", lake.get("lake_events_total")),
        ("sessions", sess.get("sessions")),
        ("late events reordered / quarantined",
         f"{sess.get('late_reordered')} / {sess.get('late_quarantined')}" if sess else None),
        ("items", sess.get("items")),
        ("train / valid / test events",
         f"{split.get('train_events'):,} / {split.get('valid_events'):,} / {split.get('test_events'):,}"
         if split else None),
        ("test sessions / next-item predictions",
         f"{split.get('test_sessions'):,} / {split.get('test_predictions'):,}" if split else None),
    ]
    for what, value in rows:
        if value is not None:
            table.add_row(what, f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)
    if raw.get("quarantine_by_reason"):
        console.print("[bold]quarantine by reason[/]\n" + str(raw["quarantine_by_reason"]))
    evaluation, registered, champion = (md.get(k, {}) for k in ("model_evaluation", "registered_model",
                                                                 "champion_model"))
    if evaluation.get("leaderboard"):
        console.print(Markdown(f"**leaderboard** (test split, {evaluation.get('n_predictions', 0):,} next-item "
                               f"predictions, full catalogue)\n\n{evaluation['leaderboard']}"))
    if registered:
        console.print(f"registered {registered.get('model')} as version {registered.get('version')} "
                      f"(alias challenger); MLflow run {registered.get('mlflow_run')}")
    bento = md.get("recommender_bento", {})
    if bento.get("built"):
        console.print(f"Bento built: {bento.get('bento_tag')} ({bento.get('serve')})")
    if champion:
        verdict = "passed" if champion.get("gate_passed") else "refused"
        console.print(f"promotion gate {verdict}; champion is version {champion.get('champion_version')}\n"
                      f"{champion.get('reasons')}")
    for name, (passed, description) in outcome.checks.items():
        mark = "[green]passed[/]" if passed else "[red]FAILED[/]"
        console.print(f"check {name}: {mark}" + ("" if passed else f"\n  {description}"))
    if outcome.settings is not None:
        s = outcome.settings
        console.print(f"lake: {s.lake_dir}\nquarantine: {s.quarantine_dir}\nsplit: {s.outputs_dir / 'split'}"
                      f"\nDagster run {outcome.run_id} (see it with `make ui`, DAGSTER_HOME={s.dagster_home})")
    if not outcome.success:
        console.print(f"[bold red]the run failed[/] at {outcome.failed_steps or 'a blocking check'}: "
                      "nothing downstream ran and nothing was committed.")
