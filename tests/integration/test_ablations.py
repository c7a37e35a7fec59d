"""The ``ablations`` stage: variant switches, and two variants end to end on a tiny catalog."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from hymirec_udfs.ablations import variants as ablations
from hymirec_udfs.core import schemas
from hymirec_udfs.core.config import load_config

TINY = [
    "ingest.source=synthetic", "synthetic.n_items=120", "synthetic.n_users=30", "synthetic.mean_history=10",
    "embed.pooling=last_token", "embed.max_tokens=32",
    "codebook.ks=[8, 8]", "codebook.iters=5",
    "sequences.recent_window=5", "sequences.max_long=10", "sequences.max_samples_per_user=6",
    "model.llm_hidden=32", "model.llm_layers=1", "model.llm_heads=2", "model.llm_kv_heads=2",
    "model.llm_intermediate=64", "model.light_width=32", "model.light_heads=2", "model.light_layers=1",
    "dmil.negatives=32", "train.epochs=1", "train.max_steps=4", "train.batch_size=32", "train.warmup_steps=1",
    "train.num_processes=1", "evaluate.chunk_items=64",
]

PAPER_TABLE_4 = ["hymirec", "w/o lightweight recommender", "w/o codebook", "euclidean codebook", "w/o indicator",
                 "w/o DMIL", "w/o window targets", "max matching"]


def test_variants_are_the_paper_set_with_one_switch_each() -> None:
    assert list(ablations.VARIANTS) == PAPER_TABLE_4
    cfg = load_config(["local", "ablations-quick"])
    assert cfg.train.epochs == 2
    switched = {
        name: {(section, key): getattr(getattr(ablations.variant_config(cfg, name), section), key)
               for section, key in [("model", "use_light"), ("model", "use_codebook"), ("model", "use_indicator"),
                                    ("dmil", "enabled"), ("dmil", "window_targets"), ("dmil", "matching"),
                                    ("codebook", "metric")]}
        for name in ablations.VARIANTS
    }
    full = switched["hymirec"]
    assert full == {("model", "use_light"): True, ("model", "use_codebook"): True, ("model", "use_indicator"): True,
                    ("dmil", "enabled"): True, ("dmil", "window_targets"): True, ("dmil", "matching"): "hungarian",
                    ("codebook", "metric"): "cosine"}
    expected = {"w/o lightweight recommender": {("model", "use_light"): False},
                "w/o codebook": {("model", "use_codebook"): False},
                "euclidean codebook": {("codebook", "metric"): "euclidean"},
                "w/o indicator": {("model", "use_indicator"): False},
                "w/o DMIL": {("dmil", "enabled"): False},
                "w/o window targets": {("dmil", "window_targets"): False},
                "max matching": {("dmil", "matching"): "max"}}
    for name, change in expected.items():
        assert {k: v for k, v in switched[name].items() if full[k] != v} == change, name
    assert full == switched["hymirec"] and cfg.model.use_light and cfg.dmil.matching == "hungarian"  # cfg untouched
    slugs = [ablations.slug(n) for n in PAPER_TABLE_4]
    assert len(set(slugs)) == 8 and all(s.replace("_", "").isalnum() for s in slugs)


def test_variant_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ablations.ENV_VARIANTS, raising=False)
    assert ablations.select_variants() == PAPER_TABLE_4
    monkeypatch.setenv(ablations.ENV_VARIANTS, "max_matching, W/O DMIL,hymirec")
    assert ablations.select_variants() == ["hymirec", "w/o DMIL", "max matching"]  # table order
    with pytest.raises(ablations.AblationError, match="unknown ablation variant.*nope"):
        ablations.select_variants("hymirec,nope")


@pytest.mark.spark
@pytest.mark.integration
@pytest.mark.slow
def test_two_variants_end_to_end(spark, make_cfg, tiny_llama_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from hymirec_udfs.recommender.item_store import ItemStore
    from hymirec_udfs.pipeline import run_pipeline, run_stage
    from hymirec_udfs.core.tables import get_table_store

    cfg = make_cfg(f"embed.model={tiny_llama_dir}", *TINY, tracking=True)
    run_pipeline(spark, cfg, to_stage="build-sequences", echo=lambda _: None)
    store = get_table_store(spark, cfg)
    tables_before = {t: store.version(t) for t in (schemas.CODEBOOKS, schemas.ITEM_CODES)}

    monkeypatch.setenv(ablations.ENV_VARIANTS, "euclidean codebook,hymirec")
    job = run_stage(spark, cfg, "ablations")
    variants = ["hymirec", "euclidean codebook"]
    assert job.status == "success" and job.row_counts["variants"] == 2

    md, csv_path = Path(job.summary["md"]), Path(job.summary["csv"])
    assert md.parent == cfg.reports_dir / f"ablations-{job.run_id}" and md.is_file() and csv_path.is_file()
    table_rows = [line for line in job.summary["table"].splitlines()[2:] if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table_rows] == variants
    assert "| R@10 | R@50 | R@100 | R@200 | N@10 |" in job.summary["table"] and job.summary["table"] in md.read_text()
    with open(csv_path) as handle:
        records = list(csv.DictReader(handle))
    assert [r["variant"] for r in records] == variants
    assert all(float(r["train_s"]) > 0 and int(r["steps"]) == 4 and r["users"] == str(job.summary["test_users"])
               for r in records)

    metrics = store.read(schemas.EVAL_METRICS).where(f"run_id LIKE '{job.run_id}-%'").collect()
    assert {(r.model, r.run_id, r.split) for r in metrics} == {
        ("hymirec", f"{job.run_id}-hymirec", "test"), ("euclidean codebook", f"{job.run_id}-euclidean_codebook", "test")}
    assert sorted(r.k for r in metrics) == [10, 10, 50, 50, 100, 100, 200, 200]
    by_key = {(r.model, r.k): r for r in metrics}
    for record in records:
        assert float(record["recall@10"]) == pytest.approx(by_key[(record["variant"], 10)].recall)
    assert all(0.0 <= r.ndcg <= r.recall <= 1.0 and r.users == job.summary["test_users"] > 0 for r in metrics)
    # read back from the committed versions: 2 variants x 4 cut-offs (test), one row per test user each
    assert job.row_counts["committed.eval_metrics"] == 8
    assert job.row_counts["committed.eval_per_user"] == 2 * job.summary["test_users"]

    # The Euclidean codebook lived in memory: the tables are unchanged, its store is Euclidean.
    assert {t: store.version(t) for t in tables_before} == tables_before
    per_user = store.read(schemas.EVAL_PER_USER).where(f"run_id = '{job.run_id}-euclidean_codebook'").count()
    assert per_user == job.summary["test_users"]
    stores = [ItemStore.load(str(p)) for p in cfg.checkpoints_dir.glob("hymirec-*/item_store")]
    assert sorted(s.codebook_metric for s in stores) == ["cosine", "euclidean"]
    euclid = next(s for s in stores if s.codebook_metric == "euclidean")
    assert np.all(euclid.coefs[1:] == 1.0) and euclid.codes.shape[1] == 2 and euclid.centroids.shape[1] == 8

    mlflow.set_tracking_uri(cfg.tracking_uri)
    run = mlflow.get_run(job.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert {"hymirec.loss", "euclidean_codebook.loss"} <= set(run.data.metrics)
    artifacts = {a.path for a in mlflow.artifacts.list_artifacts(run_id=job.mlflow_run_id, artifact_path="ablations")}
    assert {"ablations/ablations.md", "ablations/ablations.csv"} <= artifacts
