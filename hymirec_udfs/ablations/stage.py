"""Stage ``ablations``: HyMiRec and each ablation of the paper's Table 4, trained and compared.

Every variant is the configured HyMiRec with one switch changed (:data:`VARIANTS`, in
METHOD.md's order). Each is trained by the same stage-2 machinery as the ``train`` stage
(:func:`hymirec_udfs.recommender.launch.run_training`, logged into this stage's MLflow run under
the prefix ``<slug>.``), then all of them are evaluated together on the test split with
the exact full-catalog ranking of :func:`hymirec_udfs.evaluation.offline.evaluate_models` (rows go
to ``eval_per_user`` / ``eval_metrics`` with ``model`` = the variant name and ``run_id`` =
``<stage run id>-<slug>``). The comparison is written as Markdown and CSV under
``<reports_dir>/ablations-<run id>/`` and logged to MLflow.

The Euclidean-codebook variant fits a plain k-means residual codebook (``r - c``, codes
only) on the current embeddings with the configured ``codebook.ks`` in memory and hands
it to training as the item store; the ``codebooks`` / ``item_codes`` tables are not
touched. Variants are selected with ``HYMIREC_ABLATION_VARIANTS`` (comma-separated names
or slugs; ``hymirec ablations --variants`` sets it). Checkpoints are keyed by the
variant's configuration and inputs, so a re-run after a failure reuses the variants that
already finished.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from hymirec_udfs.ablations.variants import (
    VARIANTS,
    ablation_table,
    select_variants,
    slug,
    variant_config,
    write_ablation_csv,
)
from hymirec_udfs.artifacts import item_store_for
from hymirec_udfs.core import schemas, uri
from hymirec_udfs.core.choices import ModelType
from hymirec_udfs.core.config import Config
from hymirec_udfs.core.devices import auto_device
from hymirec_udfs.core.stage_api import StageContext, StageOutput

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

    from hymirec_udfs.recommender.item_store import ItemStore


def euclidean_item_store(ctx: StageContext, cfg: Config) -> tuple["ItemStore", dict[str, Any]]:
    """Item store whose codes come from a Euclidean residual codebook fitted in memory.

    Plain (unbalanced) k-means per layer on the current embeddings (a basepool of at most
    ``codebook.basepool_size``), ``codebook.ks`` centroids per layer, residual ``r - c``;
    every item is encoded with it. Nothing is written to the tables.

    Returns:
        The store (same item order and embeddings as the ``train`` stage's) and the fit
        report (``to_dict``) with the catalog's mean reconstruction cosine.
    """
    from hymirec_udfs.artifacts import current_embeddings, to_matrix
    from hymirec_udfs.codebook.residual import encode, fit_residual_codebook
    from hymirec_udfs.recommender.item_store import ItemStore

    cc = cfg.codebook
    ids, matrix = to_matrix(current_embeddings(ctx, cfg).select(schemas.ITEM_ID, "embedding").orderBy(schemas.ITEM_ID))
    device = auto_device(cc.device)
    book, report = fit_residual_codebook(matrix, cc.ks, metric="euclidean", iters=cc.iters, seed=cc.seed,
                                         balance=False, basepool_size=cc.basepool_size, device=device)
    codes, coefs, recon = encode(book, matrix, device=device)
    n, d = matrix.shape
    embeddings = np.zeros((n + 1, d), np.float32)
    embeddings[1:] = matrix
    all_codes = np.zeros((n + 1, book.num_layers), np.int64)
    all_coefs = np.zeros((n + 1, book.num_layers), np.float32)
    all_codes[1:], all_coefs[1:] = codes, coefs
    store = ItemStore(ids, embeddings, all_codes, all_coefs, book.stacked_centroids("cpu").numpy(),
                      codebook_metric="euclidean")
    info = report.to_dict() | {"catalog_recon_cosine_mean": float(np.mean(recon))}
    return store, info


def run(spark: "SparkSession", cfg: Config, ctx: StageContext) -> StageOutput:
    """Train every selected variant, evaluate them together on the test split, report."""
    from hymirec_udfs.evaluation.offline import evaluate_models
    from hymirec_udfs.recommender.launch import run_training

    t_start = time.perf_counter()
    variants = select_variants()
    slugs = {name: slug(name) for name in variants}
    ctx.logger.params({"ablations.variants": ",".join(slugs.values())})
    ctx.logger.dict({name: VARIANTS[name] for name in variants}, "ablations/variants.json")
    models: dict[str, tuple[str, str]] = {}
    timing: dict[str, dict[str, Any]] = {}
    extra: dict[str, Any] = {}
    for i, name in enumerate(variants, 1):
        s = slugs[name]
        vcfg = variant_config(cfg, name)
        print(f"[ablations {i}/{len(variants)}] {name}: training", flush=True)
        t0 = time.perf_counter()
        custom = "codebook" in VARIANTS[name]
        if custom:  # the Euclidean codebook: fitted here, tables untouched
            store, info = euclidean_item_store(ctx, vcfg)
            ctx.logger.dict(info, f"{s}.codebook/fit_report.json")
            extra[f"{s}.codebook_recon_cosine_mean"] = info["catalog_recon_cosine_mean"]
        else:
            store = item_store_for(ctx, vcfg, ModelType.HYMIREC)
        result = run_training(spark, vcfg, ctx, ModelType.HYMIREC, store, prefix=f"{s}.", custom_store=custom)
        train_s = time.perf_counter() - t0
        steps = int(result.get("steps", 0))
        timing[name] = {"train_s": train_s, "steps": steps, "epochs": result.get("epochs"),
                        "stop_reason": result.get("stop_reason", ""),
                        # a finished checkpoint is returned without training
                        "reused": result.get("resumed_from_step") is not None
                        and int(result["resumed_from_step"]) >= steps}
        models[name] = (result.get("best_checkpoint") or result["last_checkpoint"], f"{ctx.run_id}-{s}")
        print(f"[ablations {i}/{len(variants)}] {name}: {steps} steps in {train_s:.1f}s", flush=True)

    t_eval = time.perf_counter()
    eval_cfg = copy.deepcopy(cfg)
    eval_cfg.evaluate = dataclasses.replace(cfg.evaluate, splits=["test"])
    rows = evaluate_models(spark, eval_cfg, ctx, models)
    eval_s = time.perf_counter() - t_eval
    ks = sorted(int(k) for k in cfg.evaluate.ks)
    table = ablation_table(rows, variants, ks, timing)
    train_total = sum(t["train_s"] for t in timing.values())
    total_s = time.perf_counter() - t_start
    users = next((int(r["users"]) for r in rows if r["split"] == "test"), 0)
    note = (f"Test split, {users} users, exact full-catalog ranking (history excluded: "
            f"{cfg.evaluate.exclude_history}, merge: {cfg.evaluate.merge}); train.epochs={cfg.train.epochs}, "
            f"max_steps={cfg.train.max_steps}, batch_size={cfg.train.batch_size} x {cfg.train.num_processes} "
            f"processes. Wall time: training {train_total:.1f}s, evaluation {eval_s:.1f}s, total {total_s:.1f}s.")

    out_dir = cfg.reports_dir / f"ablations-{ctx.run_id}"
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out_dir / "ablations.md", out_dir / "ablations.csv"
    md_path.write_text(f"# HyMiRec ablations — run {ctx.run_id}\n\n{table}\n\n{note}\n")
    write_ablation_csv(csv_path, rows, variants, ks, timing)
    ctx.logger.artifact(str(md_path), "ablations")
    ctx.logger.artifact(str(csv_path), "ablations")
    published = uri.publish_dir(out_dir, uri.join(cfg.reports_uri, out_dir.name))
    print(table)
    print(note, flush=True)

    summary: dict[str, Any] = {"table": table, "md": uri.join(published, md_path.name),
                               "csv": uri.join(published, csv_path.name), "test_users": users,
                               "train_s_total": train_total, "eval_s": eval_s, "total_wall_s": total_s, **extra}
    # Test metrics per variant are already logged by evaluate_models (``<variant>.test.*``).
    for name in variants:
        summary[f"{slugs[name]}.train_s"] = timing[name]["train_s"]
    summary["variants"] = ", ".join(variants)
    return StageOutput(rows={"variants": len(variants)}, summary=summary)
