"""Stage runner and pipeline: lineage rows, skip when unchanged, stop on failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from hymirec_udfs.core import schemas
from hymirec_udfs.core.stage_api import StageFailed
from hymirec_udfs.pipeline import run_pipeline

pytestmark = pytest.mark.spark


def _cfg(make_cfg, tmp_path: Path, *extra: str):
    (tmp_path / "items.csv").write_text("item_id,title\n1,A\n2,B\n")
    (tmp_path / "inter.csv").write_text("item_id,user_id,timestamp\n1,u,1\n2,u,2\n")
    return make_cfg(
        "ingest.source=csv", f"ingest.data_dir={tmp_path}", "ingest.items_file=items.csv",
        "ingest.interactions_file=inter.csv", *extra,
    )


def test_pipeline_skips_unchanged_and_reruns_on_change(spark, make_cfg, tmp_path: Path) -> None:
    cfg = _cfg(make_cfg, tmp_path)
    lines: list[str] = []
    first = run_pipeline(spark, cfg, to_stage="ingest", echo=lines.append)
    assert [j.status for j in first] == ["success"]
    second = run_pipeline(spark, cfg, to_stage="ingest", echo=lines.append)
    assert second[0].skipped and "skipped: unchanged since run" in lines[-1]
    forced = run_pipeline(spark, cfg, to_stage="ingest", force=True, echo=lines.append)
    assert not forced[0].skipped
    changed = _cfg(make_cfg, tmp_path, "ingest.text_template=['Name: {title}']")
    assert not run_pipeline(spark, changed, to_stage="ingest", echo=lines.append)[0].skipped
    # A changed raw file changes the fingerprint.
    (tmp_path / "inter.csv").write_text("item_id,user_id,timestamp\n1,u,1\n2,u,2\n2,v,3\n")
    assert not run_pipeline(spark, changed, to_stage="ingest", echo=lines.append)[0].skipped


def test_output_in_an_older_shape_is_rebuilt_not_skipped(spark, make_cfg, tmp_path: Path, monkeypatch) -> None:
    # A work dir from an older release: the job_runs row and table versions match, but the
    # table lacks a column the code now declares (interactions before source_order). The
    # skip check used to say "unchanged" and later stages failed on the missing column.
    from hymirec_udfs.core.tables import DeltaRsStore, get_table_store

    cfg = _cfg(make_cfg, tmp_path)
    run_pipeline(spark, cfg, to_stage="ingest", echo=lambda _: None)
    store = get_table_store(spark, cfg)
    assert store.columns(schemas.INTERACTIONS) == schemas.arrow_schema(schemas.INTERACTIONS).names
    real = DeltaRsStore.columns
    monkeypatch.setattr(DeltaRsStore, "columns", lambda self, name: [
        c for c in real(self, name) if not (name == schemas.INTERACTIONS and c == schemas.SOURCE_ORDER)])
    lines: list[str] = []
    again = run_pipeline(spark, cfg, to_stage="ingest", echo=lines.append)
    assert not again[0].skipped and again[0].status == "success"


def test_pipeline_failure_names_stage(spark, make_cfg, tmp_path: Path) -> None:
    cfg = _cfg(make_cfg, tmp_path, "ingest.items_file=missing.csv")
    lines: list[str] = []
    with pytest.raises(StageFailed, match=r"stage 'ingest' failed: IngestError: .*missing\.csv"):
        run_pipeline(spark, cfg, to_stage="ingest", echo=lines.append)
    assert "FAILED" in lines[-1]


def test_failed_stage_records_job_run(spark, make_cfg, tmp_path: Path) -> None:
    from hymirec_udfs.core.tables import get_table_store

    cfg = _cfg(make_cfg, tmp_path, "ingest.title_col=nope", "ingest.item_id_col=nope")
    with pytest.raises(StageFailed, match="stage 'ingest' failed"):
        run_pipeline(spark, cfg, to_stage="ingest", echo=lambda _: None)
    row = get_table_store(spark, cfg).read(schemas.JOB_RUNS).first()
    assert row.status == "failed" and "nope" in row.error
