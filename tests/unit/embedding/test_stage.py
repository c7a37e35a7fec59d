"""Stage embed_items through real local Spark: incremental, model changes, bad input."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest

from hymirec_udfs.core import schemas
from hymirec_udfs.core.stage_api import StageFailed
from hymirec_udfs.pipeline import run_stage
from hymirec_udfs.core.tables import get_table_store

pytestmark = pytest.mark.spark
NOW = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


def _write_items(spark, store, rows: list[tuple[str, str]]) -> None:
    df = spark.createDataFrame(
        [(i, i, None, None, t, "test", NOW, None, None) for i, t in rows], schemas.spark_schema(schemas.ITEMS)
    )
    store.overwrite(schemas.ITEMS, df)


def _embeddings(store) -> dict[str, tuple]:
    return {r.item_id: (np.array(r.embedding), r.model_id, r.content_hash, r.embedded_at)
            for r in store.read(schemas.ITEM_EMBEDDINGS).collect()}


def test_minilm_embeds_catalog_normalised(spark, make_cfg, minilm_path) -> None:
    cfg = make_cfg(f"embed.model={minilm_path}")
    store = get_table_store(spark, cfg)
    _write_items(spark, store, [("1", "Title: Toy Story. Genres: Animation"), ("2", "Title: Heat. Genres: Crime"),
                                ("3", "Title: Up. Genres: Animation")])
    job = run_stage(spark, cfg, "embed")
    assert job.row_counts["embedded"] == 3
    emb = _embeddings(store)
    vectors = np.stack([emb[k][0] for k in "123"])
    assert vectors.shape == (3, 384) and np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert {e[1] for e in emb.values()} == {job.summary["model_id"]}
    # Same-genre cartoons sit closer than a crime film.
    assert vectors[0] @ vectors[2] > vectors[0] @ vectors[1]
    row = store.read(schemas.ITEM_EMBEDDINGS).where("item_id = '1'").first()
    assert row.dim == 384


def test_incremental_rerun_changed_text_and_new_model(spark, make_cfg, tiny_llama_dir) -> None:
    cfg = make_cfg(f"embed.model={tiny_llama_dir}", "embed.pooling=last_token")
    store = get_table_store(spark, cfg)
    _write_items(spark, store, [("a", "alpha text"), ("b", "beta text"), ("c", "gamma text")])
    first = run_stage(spark, cfg, "embed")
    assert first.row_counts["embedded"] == 3
    v0 = store.version(schemas.ITEM_EMBEDDINGS)
    before = _embeddings(store)

    again = run_stage(spark, cfg, "embed")
    assert again.row_counts["embedded"] == 0 and again.summary["model_work"] is False
    assert "no model work" in again.summary["message"]
    assert store.version(schemas.ITEM_EMBEDDINGS) == v0

    _write_items(spark, store, [("a", "alpha text"), ("b", "beta text CHANGED"), ("c", "gamma text"), ("d", "delta")])
    changed = run_stage(spark, cfg, "embed")
    assert changed.row_counts["embedded"] == 2  # b (changed) and d (new)
    after = _embeddings(store)
    assert set(after) == {"a", "b", "c", "d"}
    for key in ("a", "c"):  # untouched rows are the same rows
        assert after[key][3] == before[key][3]
        np.testing.assert_array_equal(after[key][0], before[key][0])
    assert after["b"][2] != before["b"][2] and not np.allclose(after["b"][0], before["b"][0])

    keep = make_cfg(f"embed.model={tiny_llama_dir}", "embed.pooling=mean", "embed.on_model_change=keep")
    kept = run_stage(spark, keep, "embed")
    assert kept.row_counts["embedded"] == 4
    models = store.read(schemas.ITEM_EMBEDDINGS).groupBy("model_id").count().collect()
    assert sorted(r["count"] for r in models) == [4, 4]

    replace = make_cfg(f"embed.model={tiny_llama_dir}", "embed.pooling=cls")
    replaced = run_stage(spark, replace, "embed")
    assert replaced.row_counts["embedded"] == 4 and replaced.summary["dropped_other_models"] == 2
    models = {r.model_id for r in store.read(schemas.ITEM_EMBEDDINGS).collect()}
    assert models == {replaced.summary["model_id"]}


def test_empty_text_is_quarantined_not_embedded(spark, make_cfg, tiny_llama_dir) -> None:
    cfg = make_cfg(f"embed.model={tiny_llama_dir}", "embed.pooling=last_token")
    store = get_table_store(spark, cfg)
    _write_items(spark, store, [("ok", "fine text"), ("blank", "   ")])
    job = run_stage(spark, cfg, "embed")
    assert job.row_counts == {"items": 2, "embedded": 1, "quarantined": 1,
                              "committed.item_embeddings": 1, "committed.quarantine": 1}  # read back
    assert set(_embeddings(store)) == {"ok"}
    q = store.read(schemas.QUARANTINE).first()
    assert (q.stage, q.record_key) == ("embed_items", "blank") and "empty" in q.reason


def test_nan_model_output_fails_and_leaves_table(spark, make_cfg, tiny_llama_dir, tmp_path: Path) -> None:
    import torch
    import transformers

    cfg = make_cfg(f"embed.model={tiny_llama_dir}", "embed.pooling=last_token")
    store = get_table_store(spark, cfg)
    _write_items(spark, store, [("x1", "first"), ("x2", "second")])
    run_stage(spark, cfg, "embed")
    version = store.version(schemas.ITEM_EMBEDDINGS)

    broken = tmp_path / "nan_llama"
    model = transformers.AutoModel.from_pretrained(tiny_llama_dir, local_files_only=True)
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    model.save_pretrained(broken)
    transformers.AutoTokenizer.from_pretrained(tiny_llama_dir, local_files_only=True).save_pretrained(broken)
    bad = make_cfg(f"embed.model={broken}", "embed.pooling=last_token")
    with pytest.raises(StageFailed, match=r"(?s)non-finite.*x[12]"):
        run_stage(spark, bad, "embed")
    assert store.version(schemas.ITEM_EMBEDDINGS) == version
    rows = store.read(schemas.ITEM_EMBEDDINGS).collect()
    assert len(rows) == 2 and all(np.isfinite(r.embedding).all() for r in rows)


def test_a_model_package_that_is_not_installed_fails_before_spark_work_naming_it(spark, make_cfg) -> None:
    """Before: the Databricks embed task installed the bare wheel, and the default model's
    package (an optional extra) failed deep inside the executors' UDF."""
    cfg = make_cfg("embed.model=package:hymirec_no_such_model_pkg")
    store = get_table_store(spark, cfg)
    _write_items(spark, store, [("a", "Toy Story")])
    with pytest.raises(StageFailed, match=r"needs the Python package 'hymirec_no_such_model_pkg'.*pip install "
                                          r"hymirec-no-such-model-pkg.*task's libraries") as failed:
        run_stage(spark, cfg, "embed")
    assert isinstance(failed.value.error, ModuleNotFoundError)
    assert not store.exists(schemas.ITEM_EMBEDDINGS)
    rows = store.read(schemas.JOB_RUNS).where("stage = 'embed_items'").collect()
    assert [r.status for r in rows] == ["failed"]  # recorded, with the reason
