"""Recommendation quality protocol: converged models, several seeds, paired bootstrap intervals.

    python benchmarks/quality.py [--quick] [--seeds 0,1,2] [--models hymirec,sasrec,hllm]
                                 [--recbole] [--time-split [0.8,0.9]] [--out DIR] [--work DIR]
                                 [--set key=value ...] [--model-set model:key=value ...]
                                 [--profile name ...]

Every model is trained by the product's own ``train`` stage (early stopping on validation
NDCG@10 with ``train.early_stopping_patience``, an epoch cap of ``train.epochs``) and
evaluated by its ``evaluate`` stage (exact full-catalog ranking, pessimistic ties, history
excluded unless ``--recbole``) on the same ``sequences`` table, once per seed. Each (model,
seed) leaves one result file (``<out>/runs/<model>-seed<seed>.json``: per-user test ranks
and target items), so the protocol is resumable across sittings: a finished pair is read
back, not retrained.

The summary is per model the mean and standard deviation over seeds of R@10 / N@10, and
a paired bootstrap 95% interval of HyMiRec - SASRec (and - HLLM) over the same test users (each user's
hit averaged over seeds first, users resampled 2,000 times). The same figures are given for
slices where content should win: targets that are cold (at most ``COLD_MAX`` training
users), long-tail (at most ``TAIL_MAX``) and unseen (no training user at all). ``--recbole``
keeps history items in the ranking (RecBole's full-sort protocol; ties are broken by
source order everywhere). ``--time-split`` replaces leave-one-out by a global time split
(``sequences.split=time_cutoff``, cutoffs at the given quantiles of the interaction
timestamps, default 0.8 and 0.9): test items first seen after the cutoff never appear in
training, which is where the ``unseen`` slice gets its users. Use its own ``--work`` and
``--out`` (its sequences differ).

``--set`` applies to every model, ``--model-set MODEL:key=value`` to one (each model at its
own best settings: SASRec's length and dropout, HyMiRec's item tower). Every result file
records the settings it was trained with, and is read back only under the same settings.
``--profile stage1-minilm`` puts stage 1 (the content encoder fine-tuned with the
recommendation loss, then the catalog re-embedded) into the protocol; its embeddings
differ, so its default work dir is its own (``<out>/quality-work-stage1-minilm``). A
result file is read back when its recorded overrides match; a change of the code's or the
profiles' defaults is not detected, so start a new ``--out`` after one.

Writes ``<out>/quality.json`` (default ``benchmarks/results/``): a flat object of those
figures plus ``machine``. ``--quick`` runs a tiny synthetic catalog with 2 seeds and 2
epochs in a temporary work dir (under 3 minutes on 2 cores; what ``make test`` runs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("hymirec", "sasrec", "hllm")
K = 10
BOOTSTRAP = 2000
# Slices by the target item's number of training users.
COLD_MAX = 5
TAIL_MAX = 20
# Summary key prefix -> whether a target with that many training users is in the slice.
SLICES = {"": lambda n: True, "cold_": lambda n: n <= COLD_MAX, "tail_": lambda n: n <= TAIL_MAX,
          "unseen_": lambda n: n == 0}

# Override sections that say where a run writes and how it is tracked, not what it trains
# (left out of a run's settings).
WHERE_NOT_WHAT = ("paths.", "tracking.", "spark.")
# What a single model may override (--model-set): what is read at training and evaluation
# time. The tables up to ``sequences`` are built once for every model, so an override of
# ingest, embed, stage 1, the codebook or the split would be recorded but never applied.
PER_MODEL = ("model.", "dmil.", "train.", "evaluate.", "sequences.recent_window", "sequences.max_long",
             "sequences.window_targets", "sequences.stride", "sequences.max_samples_per_user",
             "sequences.cuts_per_epoch")
# The full protocol: the local profile's model sizes, trained to convergence.
FULL = ["train.epochs=20", "train.early_stopping_patience=3"]
QUICK = [
    "ingest.source=synthetic", "synthetic.n_items=120", "synthetic.n_users=60", "synthetic.mean_history=14",
    "embed.max_tokens=32", "codebook.ks=[8, 8]", "codebook.iters=5",
    "sequences.recent_window=5", "sequences.max_long=10", "sequences.max_samples_per_user=8",
    "model.llm_hidden=32", "model.llm_layers=1", "model.llm_heads=2", "model.llm_kv_heads=2",
    "model.llm_intermediate=64", "model.light_width=32", "model.light_heads=2", "model.light_layers=1",
    "dmil.negatives=32", "train.epochs=2", "train.batch_size=32", "train.warmup_steps=2",
    "train.num_processes=1", "evaluate.chunk_items=64",
]


def metrics_from_ranks(ranks: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """Per-user hit@k and NDCG@k from 1-based ranks (0: target not in the catalog, a miss)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    hit = (ranks >= 1) & (ranks <= k)
    ndcg = np.where(hit, 1.0 / np.log2(np.maximum(ranks, 1) + 1.0), 0.0)
    return hit.astype(np.float64), ndcg


def paired_bootstrap_ci(a: np.ndarray, b: np.ndarray, *, n: int = BOOTSTRAP, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of mean(a - b) over users resampled with replacement.

    Args:
        a: per-user values of model A (averaged over seeds), aligned with ``b``.
        b: per-user values of model B.
        n: bootstrap resamples.
        seed: resampling seed (the interval is reproducible).
        level: coverage.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for no users.
    """
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if diff.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(n, diff.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def aligned_by_user(by_seed: dict[int, dict[str, Any]], seeds: Sequence[int],
                    label: str) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Per seed the order that sorts its rows by user, and the sorted users; every seed of
    ``label`` must have been evaluated on the same users."""
    orders = {seed: np.argsort(by_seed[seed]["user_ids"]) for seed in seeds}
    users = np.asarray(by_seed[seeds[0]]["user_ids"])[orders[seeds[0]]]
    for seed in seeds[1:]:
        if not np.array_equal(np.asarray(by_seed[seed]["user_ids"])[orders[seed]], users):
            raise ValueError(f"{label} seed {seed} was evaluated on other test users than seed {seeds[0]}")
    return orders, users


def summarise(runs: dict[str, dict[int, dict[str, Any]]], popularity: dict[str, int],
              seeds: Sequence[int]) -> dict[str, Any]:
    """The flat summary: per model and slice mean/std over seeds, paired intervals vs SASRec."""
    out: dict[str, Any] = {"seeds": list(seeds), "k": K, "cold_max_train_users": COLD_MAX,
                           "tail_max_train_users": TAIL_MAX}
    slices = SLICES
    per_user: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for model, by_seed in runs.items():
        orders, users = aligned_by_user(by_seed, seeds, model)
        targets = np.asarray(by_seed[seeds[0]]["target_ids"])[orders[seeds[0]]]
        hits, ndcgs = zip(*(metrics_from_ranks(np.asarray(by_seed[s]["ranks"])[orders[s]]) for s in seeds))
        train_users = np.array([popularity.get(t, 0) for t in targets])
        # Each user's rank averaged over seeds (0, a target absent from the catalog, left out):
        # where every model misses the top 10 (the unseen slice) it still says who ranks closer.
        ranks = np.array([np.asarray(by_seed[s]["ranks"], dtype=np.float64)[orders[s]] for s in seeds])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a user absent on every seed: nan
            user_rank = np.nanmean(np.where(ranks >= 1, ranks, np.nan), axis=0)
        for prefix, keep in slices.items():
            mask = np.array([keep(n) for n in train_users], dtype=bool)
            r = np.array([h[mask].mean() if mask.any() else math.nan for h in hits])
            g = np.array([x[mask].mean() if mask.any() else math.nan for x in ndcgs])
            out[f"{prefix}{model}_r10_mean"] = float(np.mean(r))
            out[f"{prefix}{model}_r10_std"] = float(np.std(r, ddof=1)) if len(r) > 1 else 0.0
            out[f"{prefix}{model}_n10_mean"] = float(np.mean(g))
            out[f"{prefix}{model}_n10_std"] = float(np.std(g, ddof=1)) if len(g) > 1 else 0.0
            out[f"{prefix}users"] = int(mask.sum())
            ranked = user_rank[mask & ~np.isnan(user_rank)]
            out[f"{prefix}{model}_median_rank"] = float(np.median(ranked)) if ranked.size else None
            per_user[(prefix, model)] = {
                "users": users[mask], "hit": np.mean(hits, axis=0)[mask], "ndcg": np.mean(ndcgs, axis=0)[mask]}
    # HyMiRec against every other model (SASRec, HLLM), paired over the same users
    for other in [m for m in runs if m != "hymirec" and "hymirec" in runs]:
        for prefix in slices:
            a, b = per_user[(prefix, "hymirec")], per_user[(prefix, other)]
            if not np.array_equal(a["users"], b["users"]):
                raise ValueError(f"HyMiRec and {other} were evaluated on different test users")
            out[f"{prefix}hymirec_minus_{other}_r10_ci"] = list(paired_bootstrap_ci(a["hit"], b["hit"]))
            out[f"{prefix}hymirec_minus_{other}_n10_ci"] = list(paired_bootstrap_ci(a["ndcg"], b["ndcg"]))
    return out


def table(summary: dict[str, Any], models: Sequence[str]) -> str:
    """Readable table: mean ± std over seeds per model and slice."""
    lines = [f"{'slice':<8} {'model':<8} {'R@10':>17} {'N@10':>17}  users  median rank"]
    for prefix, name in (("", "all"), ("cold_", "cold"), ("tail_", "tail"), ("unseen_", "unseen")):
        for m in models:
            median = summary.get(f"{prefix}{m}_median_rank")
            lines.append(f"{name:<8} {m:<8} {summary[f'{prefix}{m}_r10_mean']:.4f} ± {summary[f'{prefix}{m}_r10_std']:.4f}"
                         f"  {summary[f'{prefix}{m}_n10_mean']:.4f} ± {summary[f'{prefix}{m}_n10_std']:.4f}"
                         f"  {summary[f'{prefix}users']:>5}  {'—' if median is None else f'{median:g}'}")
        for other in [m for m in models if m != "hymirec"]:
            ci = summary.get(f"{prefix}hymirec_minus_{other}_r10_ci")
            if ci:
                lines.append(f"{name:<8} HyMiRec - {other} R@10 95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}]")
    return "\n".join(lines)


def run_settings(sets: Sequence[str], profiles: Sequence[str] = ("local",)) -> list[str]:
    """What a run was trained with: its ``key=value`` overrides, the last one per key winning
    (as in config loading), sorted; the work dir and tracking are where, not what, so left out.
    Profiles stacked on ``local`` (``--profile``) are part of it as ``profiles=...``."""
    import yaml

    settings: dict[str, str] = {} if list(profiles) == ["local"] else {"profiles": ",".join(profiles)}
    for s in sets:
        key, _, raw = s.partition("=")
        key = key.strip()
        if key.startswith(WHERE_NOT_WHAT):
            continue
        value = yaml.safe_load(raw) if raw.strip() else ""  # as config loading reads it: 0.30 == 0.3
        settings[key] = value if isinstance(value, str) else json.dumps(value)
    return [f"{k}={v}" for k, v in sorted(settings.items())]


def run_one(spark: Any, profiles: list[str], sets: list[str], model: str, seed: int, runs_dir: Path) -> dict[str, Any]:
    """Train and evaluate one (model, seed), or read back its finished result file.

    A result file is only read back when it was trained with the same settings
    (:func:`run_settings`): a run dir reused with other ``--set``s would otherwise mix
    models trained differently into one table, silently. A mismatch raises, naming the file
    and the settings that differ.
    """
    path = runs_dir / f"{model}-seed{seed}.json"
    settings = run_settings(sets, profiles)
    if path.exists():
        result = json.loads(path.read_text())
        recorded = result.get("settings")
        if recorded != settings:
            differ = sorted(set(recorded or []) ^ set(settings))
            raise ValueError(f"{path} was trained with settings {recorded} but this run asks for {settings} "
                             f"(differing: {differ}); use another --out, or delete the file to retrain it")
        return result
    from hymirec_udfs.core import schemas
    from hymirec_udfs.core.config import load_config
    from hymirec_udfs.core.tables import get_table_store
    from hymirec_udfs.pipeline import run_stage

    cfg = load_config(profiles, [*sets, f"train.model_type={model}", f"train.seed={seed}", "evaluate.baselines=[]"])
    t0 = time.perf_counter()
    trained = run_stage(spark, cfg, "train")
    evaluated = run_stage(spark, cfg, "evaluate")
    store = get_table_store(spark, cfg)
    run_ids = [r for r in (trained.mlflow_run_id, trained.run_id) if r]
    mine = (store.read(schemas.EVAL_PER_USER, version=evaluated.output_versions[schemas.EVAL_PER_USER])
            .where(f"model = '{model}' AND split IN ('valid', 'test')").where(
                " OR ".join(f"run_id = '{r}'" for r in run_ids)).select("split", "user_id", "target_id", "rank")
            .collect())
    rows = [r for r in mine if r.split == "test"]
    valid = [r for r in mine if r.split == "valid"]
    if not rows:
        raise RuntimeError(f"no test rows of {model} (train runs {run_ids}) in eval_per_user")
    valid_hit, valid_ndcg = metrics_from_ranks([int(r.rank) for r in valid])
    result = {
        "model": model, "seed": seed, "settings": settings, "user_ids": [r.user_id for r in rows], "target_ids": [r.target_id for r in rows],
        "ranks": [int(r.rank) for r in rows],
        # what settings are chosen on (never the test split)
        "valid_r10": float(valid_hit.mean()) if len(valid) else None,
        "valid_n10": float(valid_ndcg.mean()) if len(valid) else None,
        "epochs": trained.summary.get("epochs"),
        "stop_reason": trained.summary.get("stop_reason"), "best_epoch": trained.summary.get("best_epoch"),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    runs_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)  # a killed run leaves no half-written result
    return result


def time_split_sets(spark: Any, cfg: Any, quantiles: Sequence[float]) -> list[str]:
    """``--set``s of a global time split: validation and test start at these quantiles of
    the ingested interactions' timestamps (exact quantiles, computed in Spark)."""
    from hymirec_udfs.core import schemas
    from hymirec_udfs.core.tables import get_table_store

    if len(quantiles) != 2 or not 0.0 < quantiles[0] < quantiles[1] < 1.0:
        raise ValueError(f"--time-split needs two quantiles 0 < valid < test < 1, got {quantiles}")
    inter = get_table_store(spark, cfg).read(schemas.INTERACTIONS)
    valid, test = inter.approxQuantile("timestamp", list(quantiles), 0.0)
    return ["sequences.split=time_cutoff", f"sequences.valid_cutoff={int(valid)}", f"sequences.test_cutoff={int(test)}"]


def training_popularity(spark: Any, cfg: Any) -> dict[str, int]:
    """Training users per item: each user's distinct items in the training part of the history."""
    from pyspark.sql import functions as F

    from hymirec_udfs.core import schemas
    from hymirec_udfs.core.tables import get_table_store

    seqs = get_table_store(spark, cfg).read(schemas.SEQUENCES)
    train_items = F.array_distinct(F.slice(schemas.ITEM_IDS, F.lit(1), F.col(schemas.TRAIN_END)))
    counts = seqs.select(F.explode(train_items).alias("item")).groupBy("item").count().collect()
    return {r.item: int(r["count"]) for r in counts}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", default="")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--recbole", action="store_true", help="keep history items in the ranking (RecBole)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--work", default="")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--profile", dest="profiles", action="append", default=[],
                        help="a profile stacked on local for every model (e.g. stage1-minilm; use its own --work)")
    parser.add_argument("--model-set", dest="model_sets", action="append", default=[], metavar="MODEL:KEY=VALUE",
                        help="an override for one model only (e.g. sasrec:model.sasrec_max_len=50)")
    parser.add_argument("--time-split", nargs="?", const="0.8,0.9", default="",
                        help="global time split at these quantiles of the timestamps (valid, test)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in (args.seeds or ("0,1" if args.quick else "0,1,2")).split(",")]
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {list(MODELS)}")
    own_sets: dict[str, list[str]] = {m: [] for m in models}
    for item in args.model_sets:
        model, sep, kv = item.partition(":")
        if not sep or "=" not in kv or model not in MODELS:
            parser.error(f"--model-set {item!r}: expected MODEL:KEY=VALUE with MODEL one of {list(MODELS)}")
        if not kv.strip().startswith(PER_MODEL):
            parser.error(f"--model-set {item!r}: only what training and evaluation read can differ per model "
                         f"({', '.join(PER_MODEL)}); the tables up to sequences are shared, use --set")
        if model in own_sets:
            own_sets[model].append(kv)
    out = Path(args.out)
    stacked = [p.strip() for arg in args.profiles for p in arg.split(",") if p.strip() and p.strip() != "local"]
    # a stacked profile (stage 1) changes the embeddings: its own work dir unless one is given
    default_work = str(out / "-".join(["quality-work", *(Path(p).stem for p in stacked)]))
    work = args.work or (tempfile.mkdtemp(prefix="hymirec-quality-") if args.quick else default_work)
    sets = ["tracking.enabled=false", *(QUICK if args.quick else FULL), *args.sets, f"paths.work_dir={work}"]
    if args.recbole:
        sets.append("evaluate.exclude_history=false")
    profiles = ["local", *stacked]

    from hymirec_udfs.core.config import load_config
    from hymirec_udfs.core.spark import get_spark
    from hymirec_udfs.pipeline import run_pipeline

    cfg = load_config(profiles, sets)
    spark = get_spark(cfg)
    t0 = time.perf_counter()
    if args.time_split:
        run_pipeline(spark, cfg, to_stage="ingest", echo=lambda line: print(line, flush=True))
        sets += time_split_sets(spark, cfg, [float(q) for q in args.time_split.split(",")])
        cfg = load_config(profiles, sets)
    built = run_pipeline(spark, cfg, to_stage="build_sequences", echo=lambda line: print(line, flush=True))
    seq_job = next((j for j in built if j.stage == "build_sequences" and not j.skipped), None)
    if args.time_split and seq_job is not None and not seq_job.row_counts.get("test_samples"):
        raise ValueError(f"the time split at quantiles {args.time_split} leaves no test sample (no user has "
                         f"{cfg.sequences.min_train_len} items before the validation cutoff and one after the test "
                         "cutoff): choose earlier or closer quantiles")
    popularity = training_popularity(spark, cfg)
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for model in models:
        for seed in seeds:
            print(f"[quality] {model} seed {seed}", flush=True)
            runs.setdefault(model, {})[seed] = run_one(spark, profiles, [*sets, *own_sets[model]], model, seed,
                                                       out / "runs")
    summary = summarise(runs, popularity, seeds)
    summary["protocol"] = ("recbole" if args.recbole else "hymirec") + (" time-split" if args.time_split else "")
    if args.time_split:
        summary["time_split"] = {s.split("=")[0]: int(s.split("=")[1]) for s in sets if "_cutoff=" in s}
    summary["epochs_cap"] = cfg.train.epochs
    summary["settings"] = {m: run_settings([*sets, *own_sets[m]], profiles) for m in models}
    summary["stop"] = {f"{m}-seed{s}": [r["stop_reason"], r["epochs"]] for m, by in runs.items() for s, r in by.items()}
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    summary["machine"] = {"cores": os.cpu_count(), "gpu": None, "platform": platform.platform()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    print(table(summary, models))
    print(f"wrote {out / 'quality.json'}")
    return summary


if __name__ == "__main__":
    main()
