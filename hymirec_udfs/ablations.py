"""Stage ``ablations``: HyMiRec and each ablation of the paper's Table 4, trained and compared.

Every variant is the configured HyMiRec with one switch changed (:data:`VARIANTS`, in
METHOD.md's order). Each is trained by the same stage-2 machinery as the ``train`` stage
(:func:`hymirec_udfs.train_stage.run_training`, logged into this stage's MLflow run under
the prefix ``<slug>.``), then all of them are evaluated together on the test split with
the exact full-catalog ranking of :func:`hymirec_udfs.evaluation.evaluate_models` (rows go
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
import csv
import dataclasses
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np

from hymirec_udfs import schemas
from hymirec_udfs.config import Config
from hymirec_udfs.stages import StageContext, StageOutput, StageSpec

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

    from hymirec_udfs.models import ItemStore

ENV_VARIANTS = "HYMIREC_ABLATION_VARIANTS"

ABLATIONS_SPEC = StageSpec(
    "ablations", "hymirec_udfs.ablations:run", (schemas.SEQUENCES, schemas.ITEM_EMBEDDINGS),
    (schemas.EVAL_PER_USER, schemas.EVAL_METRICS),
    ("embed", "codebook", "sequences", "model", "dmil", "train", "evaluate"), "ablations",
)

# Variant name -> {config section: {field: value}} applied with dataclasses.replace on a
# copy of the configuration. Order and names follow the paper's Table 4 (METHOD.md).
# The ``codebook`` override of "euclidean codebook" is not a table change: the variant
# trains on an in-memory Euclidean codebook (see euclidean_item_store).
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "hymirec": {},
    "w/o lightweight recommender": {"model": {"use_light": False}},
    "w/o codebook": {"model": {"use_codebook": False}},
    "euclidean codebook": {"codebook": {"metric": "euclidean"}},
    "w/o indicator": {"model": {"use_indicator": False}},
    "w/o DMIL": {"dmil": {"enabled": False}},
    "w/o window targets": {"dmil": {"window_targets": False}},
    "max matching": {"dmil": {"matching": "max"}},
}


class AblationError(ValueError):
    """Unknown variant names, or a variant whose switches cannot be applied."""


def slug(name: str) -> str:
    """MLflow-safe variant name: lower-case letters, digits and underscores."""
    out = re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")
    if not out:
        raise AblationError(f"variant name {name!r} has no letters or digits")
    return out


def select_variants(spec: Optional[str] = None) -> list[str]:
    """Variant names to run, in :data:`VARIANTS` order.

    Args:
        spec: comma-separated names or slugs (case-insensitive); None reads
            ``HYMIREC_ABLATION_VARIANTS``; empty means every variant.

    Raises:
        AblationError: an unknown name (the known names and slugs are listed).
    """
    if spec is None:
        spec = os.environ.get(ENV_VARIANTS, "")
    wanted = [w.strip() for w in spec.split(",") if w.strip()]
    if not wanted:
        return list(VARIANTS)
    by_key = {name.lower(): name for name in VARIANTS} | {slug(name): name for name in VARIANTS}
    unknown = [w for w in wanted if w.lower() not in by_key and slug(w) not in by_key]
    if unknown:
        known = ", ".join(f"'{n}' ({slug(n)})" for n in VARIANTS)
        raise AblationError(f"unknown ablation variant(s) {unknown}; known: {known}")
    chosen = {by_key.get(w.lower()) or by_key[slug(w)] for w in wanted}
    return [name for name in VARIANTS if name in chosen]


def variant_config(cfg: Config, name: str) -> Config:
    """A copy of ``cfg`` with the variant's switches applied (``cfg`` is not changed)."""
    if name not in VARIANTS:
        raise AblationError(f"unknown ablation variant {name!r}; known: {list(VARIANTS)}")
    out = copy.deepcopy(cfg)
    for section, values in VARIANTS[name].items():
        try:
            setattr(out, section, dataclasses.replace(getattr(out, section), **values))
        except (AttributeError, TypeError) as exc:
            raise AblationError(f"variant {name!r}: cannot apply {section}={values}: {exc}") from exc
    return out


def _device(name: str) -> Optional[str]:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def euclidean_item_store(ctx: StageContext, cfg: Config) -> tuple["ItemStore", dict[str, Any]]:
    """Item store whose codes come from a Euclidean residual codebook fitted in memory.

    Plain (unbalanced) k-means per layer on the current embeddings (a basepool of at most
    ``codebook.basepool_size``), ``codebook.ks`` centroids per layer, residual ``r - c``;
    every item is encoded with it. Nothing is written to the tables.

    Returns:
        The store (same item order and embeddings as the ``train`` stage's) and the fit
        report (``to_dict``) with the catalog's mean reconstruction cosine.
    """
    from hymirec_udfs.codebook import encode, fit_residual_codebook
    from hymirec_udfs.codebook_stages import current_embeddings, to_matrix
    from hymirec_udfs.models import ItemStore

    cc = cfg.codebook
    ids, matrix = to_matrix(current_embeddings(ctx, cfg).select("item_id", "embedding").orderBy("item_id"))
    device = _device(cc.device)
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


def ablation_table(rows: Sequence[Mapping[str, Any]], variants: Sequence[str], ks: Sequence[int],
                   timing: Mapping[str, Mapping[str, Any]], split: str = "test") -> str:
    """Markdown table: one row per variant (in order), R@K, N@K, steps and training time.

    Args:
        rows: ``eval_metrics`` rows (dicts) with ``model`` = variant name.
        variants: variant names in display order.
        ks: cut-offs (columns).
        timing: per variant ``train_s``, ``steps`` and ``reused`` (checkpoint reused).
        split: split shown.
    """
    header = ("| variant | " + " | ".join(f"R@{k}" for k in ks) + " | " + " | ".join(f"N@{k}" for k in ks)
              + " | steps | train s |")
    lines = [header, "|---|" + "---:|" * (2 * len(ks) + 2)]
    for name in variants:
        by_k = {r["k"]: r for r in rows if r["model"] == name and r["split"] == split}
        t = timing.get(name, {})
        cell = f"{t.get('train_s', float('nan')):.1f}" + (" (reused)" if t.get("reused") else "")
        lines.append(
            f"| {name} | " + " | ".join(_fmt(by_k.get(k), "recall") for k in ks) + " | "
            + " | ".join(_fmt(by_k.get(k), "ndcg") for k in ks) + f" | {t.get('steps', '-')} | {cell} |"
        )
    return "\n".join(lines)


def _fmt(row: Optional[Mapping[str, Any]], key: str) -> str:
    return "-" if row is None else f"{row[key]:.4f}"


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], variants: Sequence[str], ks: Sequence[int],
               timing: Mapping[str, Mapping[str, Any]], split: str = "test") -> None:
    fields = (["variant", "slug"] + [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks]
              + ["mrr", "users", "steps", "epochs", "stop_reason", "train_s", "reused_checkpoint", "run_id"])
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for name in variants:
            by_k = {r["k"]: r for r in rows if r["model"] == name and r["split"] == split}
            first = next(iter(by_k.values()), {})
            t = timing.get(name, {})
            record: dict[str, Any] = {"variant": name, "slug": slug(name), "mrr": first.get("mrr"),
                                      "users": first.get("users"), "steps": t.get("steps"),
                                      "epochs": t.get("epochs"), "stop_reason": t.get("stop_reason"),
                                      "train_s": round(float(t.get("train_s", float("nan"))), 2),
                                      "reused_checkpoint": bool(t.get("reused")), "run_id": first.get("run_id")}
            for k in ks:
                record[f"recall@{k}"] = by_k[k]["recall"] if k in by_k else None
                record[f"ndcg@{k}"] = by_k[k]["ndcg"] if k in by_k else None
            writer.writerow(record)


def run(spark: "SparkSession", cfg: Config, ctx: StageContext) -> StageOutput:
    """Train every selected variant, evaluate them together on the test split, report."""
    from hymirec_udfs.evaluation import evaluate_models
    from hymirec_udfs.train_stage import run_training

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
        store = None
        if "codebook" in VARIANTS[name]:  # the Euclidean codebook: fitted here, tables untouched
            store, info = euclidean_item_store(ctx, vcfg)
            ctx.logger.dict(info, f"{s}.codebook/fit_report.json")
            extra[f"{s}.codebook_recon_cosine_mean"] = info["catalog_recon_cosine_mean"]
        result = run_training(spark, vcfg, ctx, "hymirec", prefix=f"{s}.", item_store=store)
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
    _write_csv(csv_path, rows, variants, ks, timing)
    ctx.logger.artifact(str(md_path), "ablations")
    ctx.logger.artifact(str(csv_path), "ablations")
    print(table)
    print(note, flush=True)

    summary: dict[str, Any] = {"table": table, "md": str(md_path), "csv": str(csv_path), "test_users": users,
                               "train_s_total": train_total, "eval_s": eval_s, "total_wall_s": total_s, **extra}
    # Test metrics per variant are already logged by evaluate_models (``<variant>.test.*``).
    for name in variants:
        summary[f"{slugs[name]}.train_s"] = timing[name]["train_s"]
    summary["variants"] = ", ".join(variants)
    return StageOutput(rows={"variants": len(variants)}, summary=summary)
