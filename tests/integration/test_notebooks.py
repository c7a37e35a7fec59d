"""Databricks notebooks: format and widget blocks of all of them; the ingest notebook run
locally, cell by cell, on the real MovieLens-100K with the widgets stand-in."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
HEADER = "# Databricks notebook source\n"
CELL_SEP = "\n# COMMAND ----------\n"
ALL = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))

EXPECTED = [
    "00_end_to_end.py", "01_ingest.py", "02_train_content_encoder.py", "03_embed_items.py", "04_fit_codebook.py",
    "05_encode_items.py", "06_build_sequences.py", "07_train.py", "08_evaluate.py", "09_recommend.py",
]


def _cells(path: Path) -> list[str]:
    text = path.read_text()
    assert text.startswith(HEADER), f"{path.name} must start with {HEADER!r}"
    return text[len(HEADER):].split(CELL_SEP)


def _documented_widgets(markdown_cell: str) -> list[str]:
    return re.findall(r"^# MAGIC \| `(\w+)` \|", markdown_cell, flags=re.MULTILINE)


class _RecordingWidgets:
    """A `dbutils.widgets` that records what a notebook declares (as on Databricks)."""

    def __init__(self) -> None:
        self.declared: dict[str, str] = {}

    def text(self, name: str, default: str = "", label: str = "") -> None:
        self.declared[name] = default

    def dropdown(self, name: str, default: str, choices: list, label: str = "") -> None:
        assert default in choices
        self.declared[name] = default

    def get(self, name: str) -> str:
        return self.declared[name]


def test_one_notebook_per_stage_in_pipeline_order() -> None:
    assert [p.name for p in ALL] == EXPECTED


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_notebook_is_databricks_source_opening_with_its_widgets(path: Path) -> None:
    compile(path.read_text(), str(path), "exec")
    cells = _cells(path)
    first = cells[0].strip().splitlines()
    assert first[0] == "# MAGIC %md" and all(line.startswith("# MAGIC") for line in first), (
        f"{path.name}: the first cell must be a markdown block"
    )
    documented = _documented_widgets(cells[0])
    assert {"profile", "set", "run_date"} <= set(documented)
    # On Databricks (dbutils defined) the stand-in cell does nothing and the widgets
    # cell declares exactly the widgets the markdown block lists, with the documented defaults.
    widgets = _RecordingWidgets()
    namespace: dict[str, Any] = {"dbutils": type("FakeDbutils", (), {"widgets": widgets})(), "display": print}
    for i, cell in enumerate(cells[1:3], 1):
        exec(compile(cell, f"{path.name}[cell {i}]", "exec"), namespace)
    assert namespace["dbutils"].widgets is widgets
    assert list(widgets.declared) == documented
    assert widgets.declared["profile"] == "databricks"
    assert namespace["cfg"].profile == "databricks" and namespace["cfg"].storage.catalog == "main"
    # The last code cells call the library, nothing else of substance.
    body = "".join(cells[3:])
    assert ("run_stage(spark, cfg, " in body) != ("run_pipeline(spark, cfg" in body)


def test_set_widget_accepts_lines_or_semicolons(monkeypatch: pytest.MonkeyPatch) -> None:
    from hymirec_udfs.notebook import parse_overrides

    assert parse_overrides("a.b=1; c.d=x\n") == ["a.b=1", "c.d=x"]
    assert parse_overrides("ingest.text_template=['A; {title}']\ntrain.epochs=2") == [
        "ingest.text_template=['A; {title}']", "train.epochs=2"]
    cells = _cells(NOTEBOOKS / "01_ingest.py")
    monkeypatch.setenv("HYMIREC_WIDGET_PROFILE", "local")
    monkeypatch.setenv("HYMIREC_WIDGET_SET", "ingest.text_template=['A; {title}']\ntrain.epochs=2")
    namespace: dict[str, Any] = {}
    for i, cell in enumerate(cells[1:3], 1):
        exec(compile(cell, f"01_ingest.py[cell {i}]", "exec"), namespace)
    assert namespace["cfg"].train.epochs == 2 and namespace["cfg"].ingest.text_template == ["A; {title}"]


@pytest.mark.spark
@pytest.mark.integration
def test_ingest_notebook_runs_locally_on_ml100k(spark, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hymirec_udfs.core import schemas
    from hymirec_udfs.core.config import load_config
    from hymirec_udfs.core.tables import get_table_store

    work = tmp_path / "work"
    monkeypatch.setenv("HYMIREC_WIDGET_PROFILE", "local")
    monkeypatch.setenv("HYMIREC_WIDGET_SET", f"paths.work_dir={work}\ntracking.enabled=false")
    monkeypatch.setenv("HYMIREC_WIDGET_RUN_DATE", "2026-01-01")
    monkeypatch.setenv("HYMIREC_RUN_DATE", "unset")  # the notebook sets it; monkeypatch restores it
    path = NOTEBOOKS / "01_ingest.py"
    namespace: dict[str, Any] = {"__name__": "__main__"}
    for i, cell in enumerate(_cells(path)):
        exec(compile(cell, f"{path.name}[cell {i}]", "exec"), namespace)

    assert type(namespace["dbutils"]).__name__ == "LocalDbutils"
    assert namespace["spark"] is spark  # get_spark reused the active session
    job = namespace["job"]
    assert job.stage == "ingest" and job.status == "success"
    assert job.row_counts["items"] == 1682 and job.row_counts["interactions"] == 100_000
    store = get_table_store(spark, load_config("local", [f"paths.work_dir={work}", "tracking.enabled=false"]))
    assert store.count(schemas.ITEMS) == 1682
    assert (work / "tables" / schemas.ITEMS).is_dir()
    runs = store.read(schemas.JOB_RUNS).collect()
    assert [(r.stage, r.status) for r in runs] == [("ingest", "success")]
