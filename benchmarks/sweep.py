"""Tuning HyMiRec within the paper's design: a successive-halving sweep judged on validation.

    python benchmarks/sweep.py [--quick] [--budgets 2,6,20] [--eta 3] [--base-set key=value ...]
                               [--only name,name] [--out DIR] [--work DIR]

At most 12 configurations (:data:`CONFIGS`, each a few ``--set``s over the protocol's
``local`` sizes: negatives, temperature fixed or learnable, learning rate, recent window
n, interests s, width, dropout) are trained with seed 0 by the product's own ``train``
stage and scored by its ``evaluate`` stage on the **validation** split only (NDCG@10; the
test split is never looked at here). Round r trains every surviving configuration with an
epoch cap of ``budgets[r]`` (early stopping on validation as in the protocol) and keeps the
best ``ceil(n / eta)``; the last round's budget is the protocol's cap, so its winner is a
converged run. Each (round, configuration) leaves one result file, so a sweep resumes
across sittings.

The winner is then compared under the protocol with 3 seeds against SASRec:
``python benchmarks/quality.py --models hymirec,sasrec --model-set hymirec:<each of the winner's
sets> --out <out>/sweep-winner`` (printed
at the end). ``--quick`` runs 3 configurations on the protocol's tiny synthetic catalog
(what ``make test`` runs). Writes ``<out>/sweep.json``.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (the protocol's runner and settings: one place)

RESULTS = Path(__file__).resolve().parent / "results"
# The configurations, each a change to the protocol's settings (within the paper's design).
CONFIGS: dict[str, list[str]] = {
    "base": [],
    "negatives-2048": ["dmil.negatives=2048"],
    "temperature-0.05": ["dmil.temperature=0.05"],
    "temperature-0.1": ["dmil.temperature=0.1"],
    "temperature-learnable": ["dmil.learnable_temperature=true"],
    "lr-0.0005": ["train.lr=0.0005"],
    "lr-0.002": ["train.lr=0.002"],
    "recent-10": ["sequences.recent_window=10"],
    "recent-30": ["sequences.recent_window=30"],
    "interests-4": ["model.interests=4"],
    "width-256": ["model.llm_hidden=256", "model.llm_intermediate=512"],
    "dropout-0.3": ["model.dropout=0.3"],
}
QUICK_CONFIGS = ("base", "lr-0.002", "interests-4")


def successive_halving(scores_of_round: Any, names: Sequence[str], budgets: Sequence[int],
                       eta: int) -> list[dict[str, Any]]:
    """Run the rounds: ``scores_of_round(round, budget, names) -> {name: score}`` (higher is
    better); each round keeps the best ``ceil(n / eta)`` (ties: the earlier name)."""
    rounds, alive = [], list(names)
    for r, budget in enumerate(budgets):
        scores = scores_of_round(r, budget, alive)
        ranked = sorted(alive, key=lambda n: (-scores[n], alive.index(n)))
        keep = ranked if r == len(budgets) - 1 else ranked[: max(1, math.ceil(len(alive) / eta))]
        rounds.append({"round": r, "epochs_cap": budget, "scores": {n: scores[n] for n in ranked},
                       "kept": keep[:1] if r == len(budgets) - 1 else keep})
        alive = keep
    return rounds


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budgets", default="", help="epoch cap per round (default 2,6,20; quick 1,2)")
    parser.add_argument("--eta", type=int, default=3, help="each round keeps 1/eta of the configurations")
    parser.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
    parser.add_argument("--base-set", dest="base_sets", action="append", default=[],
                        help="a setting every configuration shares (e.g. model.item_adapter=mlp_id)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--work", default="")
    args = parser.parse_args(argv)
    budgets = [int(b) for b in (args.budgets or ("1,2" if args.quick else "2,6,20")).split(",")]
    names = [n for n in args.only.split(",") if n] or list(QUICK_CONFIGS if args.quick else CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; known: {sorted(CONFIGS)}")
    if args.eta < 2 or not budgets or any(b < 1 for b in budgets):
        parser.error("--eta must be >= 2 and --budgets positive epoch caps")
    out = Path(args.out)
    work = args.work or (tempfile.mkdtemp(prefix="hymirec-sweep-") if args.quick else str(out / "quality-work"))
    base = [f"paths.work_dir={work}", "tracking.enabled=false",
            *(quality.QUICK if args.quick else quality.FULL), *args.base_sets]
    profiles = ["local"]

    from hymirec_udfs.core.config import load_config
    from hymirec_udfs.core.spark import get_spark
    from hymirec_udfs.pipeline import run_pipeline

    cfg = load_config(profiles, base)
    spark = get_spark(cfg)
    t0 = time.perf_counter()
    run_pipeline(spark, cfg, to_stage="build_sequences", echo=lambda line: print(line, flush=True))
    runs: dict[str, dict[str, Any]] = {}

    def scores_of_round(r: int, budget: int, alive: Sequence[str]) -> dict[str, float]:
        scores = {}
        for name in alive:
            print(f"[sweep] round {r} (epochs <= {budget}): {name}", flush=True)
            sets = [*base, *CONFIGS[name], f"train.epochs={budget}"]
            result = quality.run_one(spark, profiles, sets, "hymirec", 0, out / "sweep" / f"round{r}-{name}")
            runs[f"round{r}-{name}"] = {k: result[k] for k in ("valid_r10", "valid_n10", "epochs", "best_epoch",
                                                              "stop_reason", "wall_s")}
            scores[name] = result["valid_n10"]
        return scores

    rounds = successive_halving(scores_of_round, names, budgets, args.eta)
    best = rounds[-1]["kept"][0]
    best_sets = [*args.base_sets, *CONFIGS[best]]
    summary = {
        "seed": 0, "judged_on": "valid ndcg@10", "eta": args.eta, "budgets": budgets, "configurations": names,
        "rounds": rounds, "runs": runs, "best": best, "best_sets": best_sets,
        "best_valid_n10": rounds[-1]["scores"][best],
        # the winner's settings are HyMiRec's own (SASRec keeps its own), in a runs dir of their own
        "next": "python benchmarks/quality.py --models hymirec,sasrec "
                + " ".join(f"--model-set hymirec:{s}" for s in best_sets) + f" --out {out / 'sweep-winner'}",
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))
    for rnd in rounds:
        print(f"round {rnd['round']} (epochs <= {rnd['epochs_cap']}): "
              + ", ".join(f"{n} {s:.4f}" for n, s in rnd["scores"].items()) + f"; kept {rnd['kept']}")
    print(f"best: {best} (valid N@10 {summary['best_valid_n10']:.4f}); next: {summary['next']}")
    return summary


if __name__ == "__main__":
    main()
