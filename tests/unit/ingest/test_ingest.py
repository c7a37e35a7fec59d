"""Ingestion transforms: parsing each format, validation rules, quarantine, threshold."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyspark.testing import assertDataFrameEqual, assertSchemaEqual

from hymirec_udfs.core import schemas
from hymirec_udfs.ingest.raw import IngestError
from hymirec_udfs.ingest.validate import validate_interactions, validate_items
from hymirec_udfs.core.stage_api import StageFailed
from hymirec_udfs.pipeline import run_stage

pytestmark = pytest.mark.spark

TEMPLATE = ["Title: {title}", "Genres: {tags}", "Content: {description}"]


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


def test_validate_items_rules(spark) -> None:
    raw = spark.createDataFrame(
        [
            ("1", "Toy Story", None, "Animation", "r1"),
            ("2", "Heat", "cops", "Crime", "r2"),
            ("2", "Heat", "cops", "Crime", "r2-copy"),      # identical duplicate: collapses to one
            ("3", "A", None, None, "r3"),
            ("3", "B", None, None, "r3b"),                  # conflicting duplicate: both quarantined
            (None, "No id", None, None, "r4"),
            ("x5", "Bad id", None, None, "r5"),
            ("6", "", "", "", "r6"),                        # empty text
        ],
        "item_id string, title string, description string, tags string, raw_record string",
    )
    good, bad = validate_items(raw, TEMPLATE, numeric_ids=True)
    assertDataFrameEqual(
        good.select("item_id", "text"),
        spark.createDataFrame(
            [("1", "Title: Toy Story. Genres: Animation"), ("2", "Title: Heat. Genres: Crime. Content: cops")],
            "item_id string, text string",
        ),
    )
    assertDataFrameEqual(
        bad.select("raw_record", "record_key", "reason"),
        spark.createDataFrame(
            [
                ("r3", "3", "duplicate item id with conflicting text"),
                ("r3b", "3", "duplicate item id with conflicting text"),
                ("r6", "6", "empty item text"),
                ("r5", "x5", "unparsable item id"),
                ("r4", None, "null item id"),
            ],
            "raw_record string, record_key string, reason string",
        ),
    )


def test_unknown_template_placeholder_fails(spark) -> None:
    raw = spark.createDataFrame([("1", "t", None, None, "r")], "item_id string, title string, description string, tags string, raw_record string")
    with pytest.raises(IngestError, match="unknown placeholder 'plot'"):
        validate_items(raw, ["Plot: {plot}"], numeric_ids=False)


def test_validate_interactions_rules(spark) -> None:
    items = spark.createDataFrame([("10",), ("11",)], "item_id string")
    raw = spark.createDataFrame(
        [
            ("u1", "10", "1700000000", "4", "ok-epoch", 0),
            ("u1", "11", "2024-01-02T03:04:05Z", None, "ok-iso", 1),
            ("u2", "99", "1700000000", "3", "unknown-item", 2),
            (None, "10", "1700000000", "3", "null-user", 3),
            ("u3", "10", "yesterday", "3", "bad-ts", 4),
            ("u3", "10", "1700000000", "five", "bad-rating", 5),
        ],
        "user_id string, item_id string, timestamp string, rating string, raw_record string, source_order long",
    )
    good, bad = validate_interactions(raw, items, numeric_ids=False)
    expected_good = spark.createDataFrame(
        [("u1", "10", 1700000000, 4.0, 0), ("u1", "11", 1704164645, None, 1)],
        "user_id string, item_id string, timestamp long, rating double, source_order long",
    )
    good_cols = good.select("user_id", "item_id", "timestamp", "rating", "source_order")
    assertSchemaEqual(good_cols.schema, expected_good.schema)
    assertDataFrameEqual(good_cols, expected_good)
    assertDataFrameEqual(
        bad.select("raw_record", "reason"),
        spark.createDataFrame(
            [
                ("unknown-item", "unknown item (not in the validated catalog)"),
                ("null-user", "null user id"),
                ("bad-ts", "unparsable timestamp"),
                ("bad-rating", "unparsable rating"),
            ],
            "raw_record string, reason string",
        ),
    )


def _generic_cfg(make_cfg, tmp_path: Path, items: str, inter: str, *extra: str):
    _write(tmp_path / "items.csv", items)
    _write(tmp_path / "inter.csv", inter)
    return make_cfg(
        "ingest.source=csv", f"ingest.data_dir={tmp_path}", "ingest.items_file=items.csv",
        "ingest.interactions_file=inter.csv", *extra,
    )


def test_generic_csv_stage_writes_tables_and_quarantine(spark, make_cfg, tmp_path: Path) -> None:
    from hymirec_udfs.core.tables import get_table_store

    cfg = _generic_cfg(
        make_cfg, tmp_path,
        "item_id,title,description,tag\n1,Cat video,cats,pets\n2,Dog video,,pets\n3,,,\n",
        "item_id,user_id,timestamp\n1,u1,100\n2,u1,200\n1,u2,150\n7,u2,160\n2,u2,later\n",
        "ingest.max_quarantine_fraction=0.5",
    )
    job = run_stage(spark, cfg, "ingest")
    store = get_table_store(spark, cfg)
    assert job.row_counts["items"] == 2 and job.row_counts["interactions"] == 3
    assert job.row_counts["quarantined"] == 3
    q = {(r.source, r.reason) for r in store.read(schemas.QUARANTINE).collect()}
    assert q == {
        ("csv:items", "empty item text"),
        ("csv:interactions", "unknown item (not in the validated catalog)"),
        ("csv:interactions", "unparsable timestamp"),
    }
    raw = store.read(schemas.QUARANTINE).where("reason = 'unparsable timestamp'").first().raw_record
    assert '"timestamp":"later"' in raw
    # source order follows the file's line order (and is not part of the raw record)
    inter = sorted(store.read(schemas.INTERACTIONS).collect(), key=lambda r: r.source_order)
    assert [(r.user_id, r.item_id) for r in inter] == [("u1", "1"), ("u1", "2"), ("u2", "1")]
    assert '"source_order"' not in raw
    runs = store.read(schemas.JOB_RUNS).collect()
    assert [(r.stage, r.status) for r in runs] == [("ingest", "success")]
    assert runs[0].output_versions == {"items": 0, "interactions": 0, "quarantine": 0}
    assert runs[0].row_counts["interactions"] == 3


def test_quarantine_threshold_fails_and_keeps_tables(spark, make_cfg, tmp_path: Path) -> None:
    from hymirec_udfs.core.tables import get_table_store

    cfg = _generic_cfg(
        make_cfg, tmp_path, "item_id,title\n1,A\n", "item_id,user_id,timestamp\n1,u,1\n9,u,2\n8,u,3\n",
        "ingest.max_quarantine_fraction=0.1",
    )
    with pytest.raises(StageFailed, match=r"2 of 4 raw rows \(50.0%\) were quarantined"):
        run_stage(spark, cfg, "ingest")
    store = get_table_store(spark, cfg)
    assert not store.exists(schemas.ITEMS)
    assert store.count(schemas.QUARANTINE) == 2
    assert [r.status for r in store.read(schemas.JOB_RUNS).collect()] == ["failed"]


def test_missing_column_mapping_is_named(spark, make_cfg, tmp_path: Path) -> None:
    cfg = _generic_cfg(make_cfg, tmp_path, "id,title\n1,A\n", "item_id,user_id,timestamp\n1,u,1\n")
    with pytest.raises(StageFailed, match=r"items\.csv: column 'item_id' \(ingest\.item_id_col\) not found"):
        run_stage(spark, cfg, "ingest")


def test_missing_raw_file_is_named(spark, make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("ingest.source=ml-1m", f"ingest.data_dir={tmp_path}")
    with pytest.raises(StageFailed, match=r"IngestError: ingest source 'ml-1m': file not found: .*movies\.dat"):
        run_stage(spark, cfg, "ingest")


def test_grouplens_and_ml1m_formats(spark, make_cfg, tmp_path: Path) -> None:
    from hymirec_udfs.ingest.sources import read_raw

    gl = tmp_path / "gl"
    gl.mkdir()
    flags = ["0"] * 19
    flags[1] = flags[5] = "1"  # Action, Comedy
    _write(gl / "u.item", "1|Toy Stóry (1995)|01-Jan-1995||http://x|" + "|".join(flags) + "\n", encoding="latin1")
    _write(gl / "u.data", "196\t1\t3\t881250949\n")
    raw = read_raw(spark, make_cfg("ingest.source=ml-100k-grouplens", f"ingest.data_dir={gl}"))
    item = raw.items.first()
    assert (item.item_id, item.title, item.description, item.tags) == ("1", "Toy Stóry", "Released in 1995", "Action, Comedy")
    inter = raw.interactions.first()
    assert (inter.user_id, inter.item_id, inter.timestamp, inter.rating) == ("196", "1", "881250949", "3")

    m1 = tmp_path / "m1"
    m1.mkdir()
    _write(m1 / "movies.dat", "1::Toy Story (1995)::Animation|Children's|Comedy\n", encoding="latin1")
    _write(m1 / "ratings.dat", "2::1::5::978300760\n\n1::1::4::978300760\n3::1::3::978300761\n")
    raw = read_raw(spark, make_cfg("ingest.source=ml-1m", f"ingest.data_dir={m1}"))
    item = raw.items.first()
    assert (item.title, item.tags) == ("Toy Story", "Animation, Children's, Comedy")
    # the latin-1 path numbers lines itself: source order is the line order, blank lines skipped
    rows = sorted(raw.interactions.collect(), key=lambda r: r.source_order)
    assert [(r.user_id, r.timestamp) for r in rows] == [("2", "978300760"), ("1", "978300760"), ("3", "978300761")]


def test_synthetic_is_deterministic_and_skewed(spark, make_cfg) -> None:
    import numpy as np

    from hymirec_udfs.ingest.sources import read_raw

    cfg = make_cfg("ingest.source=synthetic", "synthetic.n_items=300", "synthetic.n_users=40")
    a = read_raw(spark, cfg)
    b = read_raw(spark, cfg)
    assert a.items.orderBy("item_id").collect() == b.items.orderBy("item_id").collect()
    assert a.interactions.count() == b.interactions.count() > 40 * 5
    lengths = np.array([len((r.title + " " + r.description).split()) for r in a.items.collect()])
    assert lengths.min() >= 4 and lengths.max() <= 256
    assert np.median(lengths) < lengths.mean()  # right-skewed (lognormal)
    users = a.interactions.groupBy("user_id").agg({"item_id": "count"}).count()
    assert users == 40
