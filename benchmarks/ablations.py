"""The paper's Table 4 under the quality protocol: every ablation, several seeds, paired intervals.

    python benchmarks/ablations.py [--quick] [--seeds 0,1,2] [--epochs 6] [--variants name,name]
                                   [--set key=value ...] [--out DIR] [--work DIR]

``hymirec ablations`` (the product's on-demand stage) trains each variant once; this runs
the same variants (:data:`hymirec_udfs.ablations.variants.VARIANTS`, one place) under the
protocol of ``benchmarks/quality.py``: each (variant, seed) trained by the product's
``train`` stage with a **fixed epoch budget** (``--epochs``, no early stopping, so every
variant gets the same training) and scored by its ``evaluate`` stage (exact full-catalog
ranking, history excluded) on the same test users. Every epoch is trained; as in the
``train`` stage, the checkpoint evaluated is the best epoch on **validation** NDCG@10 (the
test split never chooses; ``<slug>_best_epoch`` says which). Per variant the mean and standard
deviation over seeds of R@K / N@K (K = 10, 50, 200), and a paired bootstrap 95% interval
of variant - HyMiRec over the same users, per user averaged over seeds first.

The Euclidean-codebook variant is the pipeline itself with ``codebook.metric=euclidean``
and ``codebook.balance=false`` (plain residual k-means, as the stage's in-memory variant):
it refits the codebook tables, so it gets its own work dir (``<work>-euclidean``) and the
shared one is never touched. Each (variant, seed) leaves one result file
(``<out>/ablations/<slug>/hymirec-seed<seed>.json``, read back only under the same
settings), so a run resumes across sittings. ``--quick``: 3 variants on the protocol's
tiny synthetic catalog, 1 seed, 1 epoch (what ``make test`` runs). Writes
``<out>/ablations.json`` (``ablations-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (the protocol's runner, metrics and interval: one place)

RESULTS = Path(__file__).resolve().parent / "results"
KS = (10, 50, 200)
FULL_VARIANT = "hymirec"
QUICK_VARIANTS = ("hymirec", "euclidean codebook", "w/o DMIL")
# What the Euclidean variant changes besides the metric: plain k-means, as the stage's.
EUCLIDEAN_EXTRA = ["codebook.balance=false"]


def variant_sets(name: str) -> list[str]:
    """The variant's switches as ``--set`` overrides (``{"dmil": {"enabled": False}}`` ->
    ``dmil.enabled=false``)."""
    from hymirec_udfs.ablations.variants import VARIANTS

    sets = []
    for section, values in VARIANTS[name].items():
        for key, value in values.items():
            sets.append(f"{section}.{key}={value if isinstance(value, str) else json.dumps(value)}")
    return sets + (EUCLIDEAN_EXTRA if "codebook" in VARIANTS[name] else [])


def summarise(runs: dict[str, dict[int, dict[str, Any]]], seeds: Sequence[int]) -> dict[str, Any]:
    """Per variant and K: mean/std over seeds of R@K and N@K, and the paired 95% interval of
    variant - HyMiRec (users averaged over seeds first, then resampled)."""
    from hymirec_udfs.ablations.variants import slug

    out: dict[str, Any] = {"seeds": list(seeds), "ks": list(KS)}
    per_user: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    users_of: dict[str, np.ndarray] = {}
    targets_of: dict[str, np.ndarray] = {}
    for name, by_seed in runs.items():
        s = slug(name)
        orders, users = quality.aligned_by_user(by_seed, seeds, f"variant {name!r}")
        users_of[name] = users
        # the same users must also have the same targets (the Euclidean variant's sequences
        # come from another work dir)
        targets_of[name] = np.asarray(by_seed[seeds[0]].get("target_ids", users))[orders[seeds[0]]]
        per_user[name] = {}
        for k in KS:
            hits, ndcgs = zip(*(quality.metrics_from_ranks(np.asarray(by_seed[seed]["ranks"])[orders[seed]], k)
                                for seed in seeds))
            r = np.array([h.mean() for h in hits])
            g = np.array([x.mean() for x in ndcgs])
            out[f"{s}_r{k}_mean"], out[f"{s}_n{k}_mean"] = float(r.mean()), float(g.mean())
            out[f"{s}_r{k}_std"] = float(np.std(r, ddof=1)) if len(r) > 1 else 0.0
            out[f"{s}_n{k}_std"] = float(np.std(g, ddof=1)) if len(g) > 1 else 0.0
            per_user[name][k] = (np.mean(hits, axis=0), np.mean(ndcgs, axis=0))
        out[f"{s}_epochs"] = [by_seed[seed].get("epochs") for seed in seeds]
        out[f"{s}_best_epoch"] = [by_seed[seed].get("best_epoch") for seed in seeds]
    if FULL_VARIANT in runs:
        out["users"] = int(len(users_of[FULL_VARIANT]))
        for name in runs:
            if name == FULL_VARIANT:
                continue
            if not np.array_equal(users_of[name], users_of[FULL_VARIANT]):
                raise ValueError(f"variant {name!r} and HyMiRec were evaluated on different test users")
            if not np.array_equal(targets_of[name], targets_of[FULL_VARIANT]):
                raise ValueError(f"variant {name!r} and HyMiRec were evaluated on different test targets")
            for k in KS:
                (h, g), (h0, g0) = per_user[name][k], per_user[FULL_VARIANT][k]
                out[f"{slug(name)}_minus_hymirec_r{k}_ci"] = list(quality.paired_bootstrap_ci(h, h0))
                out[f"{slug(name)}_minus_hymirec_n{k}_ci"] = list(quality.paired_bootstrap_ci(g, g0))
    return out


def table(summary: dict[str, Any], variants: Sequence[str]) -> str:
    """Markdown table: mean ± std per K, and the R@10 / N@10 intervals against HyMiRec."""
    from hymirec_udfs.ablations.variants import slug

    head = ("| variant | " + " | ".join(f"R@{k}" for k in KS) + " | " + " | ".join(f"N@{k}" for k in KS)
            + " | − HyMiRec R@10, 95% CI | − HyMiRec N@10, 95% CI |")
    lines = [head, "|---" * (2 * len(KS) + 3) + "|"]
    for name in variants:
        s = slug(name)
        cells = [f"{summary[f'{s}_r{k}_mean']:.4f} ± {summary[f'{s}_r{k}_std']:.4f}" for k in KS]
        cells += [f"{summary[f'{s}_n{k}_mean']:.4f} ± {summary[f'{s}_n{k}_std']:.4f}" for k in KS]
        for metric in ("r10", "n10"):
            ci = summary.get(f"{s}_minus_hymirec_{metric}_ci")
            cells.append(f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci and not any(map(math.isnan, ci)) else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    from hymirec_udfs.ablations.variants import AblationError, select_variants, slug

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", default="")
    parser.add_argument("--epochs", type=int, default=None, help="fixed epoch budget per run (default 6; quick 1)")
    parser.add_argument("--variants", default="", help="comma-separated names or slugs (default: all)")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--work", default="")
    args = parser.parse_args(argv)
    try:
        variants = select_variants(args.variants or (",".join(QUICK_VARIANTS) if args.quick else ""))
    except AblationError as exc:
        parser.error(str(exc))
    if FULL_VARIANT not in variants:
        variants.insert(0, FULL_VARIANT)  # every interval is against the full model
    epochs = args.epochs if args.epochs is not None else (1 if args.quick else 6)
    if epochs < 1:
        parser.error("--epochs must be >= 1")
    shared = [s for s in args.sets if not s.strip().startswith(quality.PER_MODEL)]
    if shared:  # they would rebuild the shared tables (quality.py's work dir) for a study of its own
        parser.error(f"--set {shared}: only what training and evaluation read ({', '.join(quality.PER_MODEL)}) "
                     "can be set here; the tables up to sequences are the protocol's")
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    out = Path(args.out)
    work = str(Path(args.work or (tempfile.mkdtemp(prefix="hymirec-ablations-") if args.quick
                                  else out / "quality-work")))
    # A fixed budget: the protocol's sizes, every epoch trained (no early stopping).
    base = ["tracking.enabled=false", *(quality.QUICK if args.quick else quality.FULL), *args.sets,
            f"train.epochs={epochs}", "train.early_stopping_patience=0"]
    profiles = ["local"]

    from hymirec_udfs.core.config import load_config
    from hymirec_udfs.core.spark import get_spark
    from hymirec_udfs.pipeline import run_pipeline

    spark = None
    t0 = time.perf_counter()
    built: set[str] = set()
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for name in variants:
        own = variant_sets(name)
        # a variant that refits the codebook gets a work dir of its own, beside the shared one
        where = work + ("-euclidean" if any(s.startswith("codebook.") for s in own) else "")
        sets = [*base, *own, f"paths.work_dir={where}"]
        cfg = load_config(profiles, sets)
        spark = spark or get_spark(cfg)
        if where not in built:  # tables up to sequences for this work dir (skipped when current)
            run_pipeline(spark, cfg, to_stage="build_sequences", echo=lambda line: print(line, flush=True))
            built.add(where)
        for seed in seeds:
            print(f"[ablations] {name} seed {seed} ({epochs} epochs)", flush=True)
            runs.setdefault(name, {})[seed] = quality.run_one(spark, profiles, sets, "hymirec", seed,
                                                              out / "ablations" / slug(name))
    summary = summarise(runs, seeds)
    summary.update({"variants": variants, "epochs": epochs, "settings": {slug(n): variant_sets(n) for n in variants},
                    "base_sets": args.sets, "wall_s": round(time.perf_counter() - t0, 1)})
    target = out / ("ablations-quick.json" if args.quick else "ablations.json")  # make bench keeps the full run
    out.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(summary, indent=2, sort_keys=True))
    print(table(summary, variants))
    print(f"wrote {target}")
    return summary


if __name__ == "__main__":
    main()
