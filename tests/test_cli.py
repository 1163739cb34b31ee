"""The command line: real subprocesses of the installed `sessionrec`, good and hostile flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

SESSIONREC = [sys.executable, "-m", "sessionrec.cli"]


def run(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*SESSIONREC, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def test_help_lists_commands() -> None:
    out = run("--help")
    assert out.returncode == 0
    for command in ("generate", "split", "run", "formats"):
        assert command in out.stdout


def test_split_on_real_yoochoose(shared_data, tmp_path) -> None:
    files = shared_data / "yoochoose" / "session-rec"
    out = run("split", "--events", str(files / "yoochoose-clicks-100k_train_full.txt"),
              "--events", str(files / "yoochoose-clicks-100k_test.txt"), "--format", "yoochoose",
              "--test-days", "1", "--keep-repeats", "--out", str(tmp_path / "split"), "--home", str(tmp_path / "h"))
    assert out.returncode == 0, out.stderr
    header = (tmp_path / "split" / "test.tsv").read_text().splitlines()[0]
    assert header == "SessionId\tItemId\tTime"
    stats = json.loads((tmp_path / "split" / "stats.json").read_text())
    assert stats["files"]["test"]["sessions"] > 3_000
    assert stats["ingest"]["rows_in"] == 70_278 + 13_568


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["split", "--events", "/nonexistent/file.csv", "--out", "OUT"], "no such file"),
        (["split", "--events", "IN", "--out", "OUT", "--test-days", "-1"], "test-days"),
        (["split", "--events", "IN", "--out", "OUT", "--format", "nonsense"], "format"),
        (["generate", "--out", "OUT/x.parquet", "--events", "0"], "events"),
        (["generate", "--out", "OUT/x.parquet", "--events", "lots"], "events"),
        (["generate", "--out", "OUT/x.weird", "--events", "100"], "extension"),
        (["run", "--config", "/nonexistent.toml"], "does not exist"),
        (["serve", "--workers", "0"], "workers"),
        (["serve", "--workers", "many"], "workers"),
    ],
)
def test_bad_flags_give_one_clear_error(tmp_path, args: list[str], message: str) -> None:
    source = tmp_path / "in.csv"
    source.write_text("session_id,item_id,timestamp\ns,i,2024-01-01T00:00:00Z\n")
    args = [a.replace("IN", str(source)).replace("OUT", str(tmp_path / "out")) for a in args]
    out = run(*args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message.lower() in (out.stderr + out.stdout).lower()
    assert "Traceback" not in out.stderr


def test_generate_then_split_with_derived_sessions(tmp_path) -> None:
    events = tmp_path / "ev.csv"
    assert run("generate", "--out", str(events), "--events", "20000", "--no-session-ids", "--days", "4").returncode == 0
    frame = pl.read_csv(events)
    assert frame.height == 20_000 and frame["session_id"].null_count() == 20_000
    out = run("split", "--events", str(events), "--out", str(tmp_path / "s"), "--home", str(tmp_path / "h"))
    assert out.returncode == 0, out.stderr
    train = pl.read_csv(tmp_path / "s" / "train.tsv", separator="\t")
    assert train["SessionId"].cast(pl.String).str.contains("#").all()  # derived from user ids by timeout
