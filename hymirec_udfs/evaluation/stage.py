"""Stage ``evaluate``: exact full-catalog ranking of valid/test users, baselines, report.

The trained model is found from an MLflow run id (``evaluate.model_run_id``) or the last
successful ``train`` run. Users are scored in a pandas UDF (``mapInPandas``): each Python
worker loads the model once, computes every user's interest embeddings, and ranks the
whole catalog exactly in chunks with :func:`hymirec_udfs.evaluation.scoring.rank_targets` (history
excluded by default, interests merged by max score or by union of per-interest top-K).
Per-user rows go to ``eval_per_user``; Spark aggregates them into ``eval_metrics``.
Baselines (SASRec, HLLM-style single interest) are trained by the same stage-2 machinery
on the same sequences and evaluated by the same code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from hymirec_udfs.artifacts import item_store_for, trained_model
from hymirec_udfs.core import schemas, uri
from hymirec_udfs.core.config import Config
from hymirec_udfs.core.stage_api import StageContext, StageOutput
from hymirec_udfs.evaluation.offline import evaluate_models, metrics_table

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession


def run(spark: "SparkSession", cfg: Config, ctx: StageContext) -> StageOutput:
    """Evaluate the trained HyMiRec and the configured baselines; write the report."""
    from hymirec_udfs.recommender.launch import run_training

    checkpoint, run_id = trained_model(ctx, cfg)
    models = {cfg.train.model_type: (checkpoint, run_id)}
    # Only servable (content) models enter the registry: SASRec cannot score unseen items.
    gated = cfg.registry.enabled and cfg.tracking.enabled and cfg.train.model_type != "sasrec"
    champion = None
    if gated:
        from hymirec_udfs.core import registry
        from hymirec_udfs.evaluation.promotion import CHAMPION_MODEL, metric_column

        metric_column(cfg.registry.metric, list(cfg.evaluate.ks))  # a bad setting fails before any work
        champion = registry.by_alias(cfg, registry.CHAMPION)
        if champion is not None and champion.run_id != run_id:
            # The champion is scored on the same test users, so the gate's pairs are exact.
            import dataclasses

            served = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, model_run_id=champion.run_id))
            models[CHAMPION_MODEL] = (trained_model(ctx, served)[0], champion.run_id)
    # Baselines train on the cluster evaluate runs on (the CPU job cluster on Databricks):
    # train.use_gpu without GPU task slots here trains them on CPUs (said in the summary).
    import dataclasses

    from hymirec_udfs.training.launch import fit_to_session

    baseline_train, baseline_note = fit_to_session(spark, cfg.train) if cfg.evaluate.baselines else (cfg.train, "")
    baseline_cfg = dataclasses.replace(cfg, train=baseline_train)
    for baseline in cfg.evaluate.baselines:
        if baseline == cfg.train.model_type:
            continue
        result = run_training(spark, baseline_cfg, ctx, baseline, item_store_for(ctx, cfg, baseline),
                              prefix=f"{baseline}.")
        models[baseline] = (result.get("best_checkpoint") or result["last_checkpoint"], f"{ctx.run_id}-{baseline}")
    rows = evaluate_models(spark, cfg, ctx, models)
    table = metrics_table(rows)
    report = write_report(spark, cfg, ctx, rows, models)
    ctx.logger.artifact(str(Path(report).parent), "report")
    published = uri.publish_dir(Path(report).parent, uri.join(cfg.reports_uri, ctx.run_id))
    print(table)
    summary: dict[str, Any] = {"report": uri.join(published, Path(report).name), "metrics_table": table}
    if baseline_note:
        summary["baselines_device"] = baseline_note
    for r in rows:
        if r["split"] == "test" and r["k"] == 10:
            summary[f"{r['model']}.test.recall@10"] = r["recall"]
            summary[f"{r['model']}.test.ndcg@10"] = r["ndcg"]
    if gated:
        from hymirec_udfs.evaluation.promotion import run_gate

        decision = run_gate(ctx, cfg, cfg.train.model_type, run_id, champion)
        summary.update(decision)
        print(f"registry: {decision['registry.model_name']} version {decision['registry.version']} is challenger; "
              f"champion: version {decision['registry.champion_version']} ({decision['promotion.reason']})")
    users = {r["split"]: r["users"] for r in rows}
    return StageOutput(rows={f"{s}_users": int(n) for s, n in users.items()} | {"models": len(models)}, summary=summary)


# Values a report histogram reads at most (a seeded sample beyond that).
PLOT_SAMPLE = 100_000


def _bounded_sample(df: Any) -> np.ndarray:
    """One numeric column as numpy, seeded-sampled down to about :data:`PLOT_SAMPLE` rows."""
    n = df.count()
    if n > PLOT_SAMPLE:
        df = df.sample(fraction=PLOT_SAMPLE / n, seed=0)
    return df.toArrow().column(0).to_numpy()


def write_report(
    spark: "SparkSession", cfg: Config, ctx: StageContext, rows: Sequence[dict[str, Any]],
    models: dict[str, tuple[str, str]],
) -> str:
    """HTML report with plots under ``<reports_dir>/<run id>/``; returns its path."""
    from pyspark.sql import functions as F

    from hymirec_udfs.evaluation.report import build_report

    metrics_by_model: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["split"] == "test":
            metrics_by_model.setdefault(r["model"], {})[f"recall@{r['k']}"] = r["recall"]
            metrics_by_model[r["model"]][f"ndcg@{r['k']}"] = r["ndcg"]
    sizes, recon = None, None
    if ctx.store.exists(schemas.ITEM_CODES):
        # Aggregated in Spark: sum(ks) cluster sizes, and a bounded sample of cosines for
        # the histogram -- never the catalog's codes on the driver.
        from hymirec_udfs.artifacts import latest_codebook

        codes_df = ctx.store.read(schemas.ITEM_CODES).where(F.col("codebook_version") == latest_codebook(ctx)[0])
        exploded = codes_df.select(F.posexplode("codes").alias("layer", "code"))
        counts = exploded.groupBy("layer", "code").count().collect()
        by_layer: dict[int, list[int]] = {}
        for r in counts:
            by_layer.setdefault(int(r["layer"]), []).append(int(r["count"]))
        ks = list(cfg.codebook.ks)
        # Unused codes have no row in the counts: pad them back as empty clusters.
        sizes = [np.sort(np.asarray(by_layer[layer] + [0] * max(0, (ks[layer] if layer < len(ks) else 0)
                                                                  - len(by_layer[layer]))))[::-1]
                 for layer in sorted(by_layer)]
        recon = _bounded_sample(codes_df.select("recon_cosine"))
    curves: dict[str, list[tuple[int, float]]] = {}
    for name, (checkpoint, _) in models.items():
        path = Path(checkpoint).parent / "metrics.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("kind") == "train" and "loss" in rec:
                    curves.setdefault(f"{name} train_loss", []).append((rec["step"], rec["loss"]))
                if rec.get("kind") == "val" and "val_ndcg@10" in rec:
                    curves.setdefault(f"{name} val_ndcg@10", []).append((rec["step"], rec["val_ndcg@10"]))
    diversity = _bounded_sample(
        ctx.store.read(schemas.EVAL_PER_USER)
        .where((F.col("run_id") == models[cfg.train.model_type][1]) & (F.col("split") == "test")
               & F.col("interest_diversity").isNotNull())
        .select("interest_diversity")
    )
    out_dir = cfg.reports_dir / ctx.run_id
    return build_report(
        str(out_dir), metrics_by_model=metrics_by_model, ks=list(cfg.evaluate.ks), codebook_cluster_sizes=sizes,
        recon_cosine=recon, train_curves=curves or None, interest_diversity=diversity if len(diversity) else None,
        title=f"HyMiRec evaluation — run {ctx.run_id}",
    )
