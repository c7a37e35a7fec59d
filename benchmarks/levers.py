"""Which lever moves what: finished protocol runs compared step by step, with paired intervals.

    python benchmarks/levers.py [--step "NAME=RUNS_DIR[:MODEL][@BASE]" --step ...] [--reference "NAME=RUNS_DIR[:MODEL]"]
                                [--work DIR] [--out FILE] [--quick]

Each ``--step`` is a configuration already run under ``benchmarks/quality.py`` (a runs dir
of ``<model>-seed<N>.json`` result files; ``MODEL`` defaults to ``hymirec``), in the order
the levers were added: the frozen-content model, then the item tower, then the schedule,
then stage 1, and so on. A step adds its lever to the step before it, or to the step named
after ``@`` (``NAME=RUNS_DIR@BASE``: two levers tried on the same base). Nothing is
trained here: the result files carry each user's test rank and target, so every step is
scored on the same users and targets as the others and the comparison costs seconds.
Per step: the seeds, mean ± std over seeds of R@10 / N@10,
the settings the runs were trained with (as recorded in their files), the mean validation
NDCG@10 (what chooses a setting; the test split never does), and paired bootstrap
95% intervals (users resampled, each user's hit averaged over seeds first, as in
``quality.py``) of this step - the previous step (what this lever adds), - the first step
(what all levers so far add), and - the ``--reference`` (e.g. SASRec). ``--work`` (a
protocol work dir holding ``sequences``) adds the cold and long-tail slices by the target's
training users.

Without ``--step``, the committed runs of ``benchmarks/results/`` in the order the levers
were measured on ML-100K (:data:`DEFAULT_STEPS`, against SASRec at its usual settings):
the README's lever table. ``--quick`` is the same (it reads files only: seconds) but writes
``levers-quick.json``, so ``make bench`` leaves the committed table alone.

Refuses, naming the step and file: a step with fewer than 2 seeds, seeds whose settings
differ, and steps evaluated on other users or other targets (another split or catalog).
Writes ``--out`` (default ``benchmarks/results/levers.json``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (the protocol's metrics, alignment and interval: one place)

RESULTS = Path(__file__).resolve().parent / "results"
# The README's lever table: the committed protocol runs (3 seeds each, ML-100K, 943 users).
DEFAULT_STEPS = (
    f"frozen content (defaults)={RESULTS / 'runs'}",
    f"+ mlp_id item tower, τ 0.1={RESULTS / 'sweep-winner' / 'runs'}",
    f"mlp_id, τ 0.07, lr 0.002 on a 6-epoch schedule={RESULTS / 'lr002-e6' / 'runs'}",
    f"+ stage 1 (MiniLM fine-tuned 150 steps, catalog re-embedded)={RESULTS / 'stage1' / 'runs'}",
    f"+ every training cut (no 50-per-user cap)={RESULTS / 'allcuts' / 'runs'}"
    "@mlp_id, τ 0.07, lr 0.002 on a 6-epoch schedule",
)
DEFAULT_REFERENCE = f"SASRec (length 50, dropout 0.3)={RESULTS / 'lr002-e6' / 'runs'}:sasrec"
SLICES = ("", "cold_", "tail_")  # of quality.SLICES (the unseen slice is empty under leave-one-out)


def parse_step(text: str) -> tuple[str, Path, str, Optional[str]]:
    """``NAME=RUNS_DIR[:MODEL][@BASE]`` -> (name, runs dir, model, base step or None)."""
    name, sep, rest = text.partition("=")
    rest, at, base = rest.partition("@")
    if not sep or not name.strip() or not rest.strip() or (at and not base.strip()):
        raise ValueError(f"step {text!r}: expected NAME=RUNS_DIR[:MODEL][@BASE]")
    match = re.fullmatch(r"(.+):([A-Za-z][A-Za-z0-9_-]*)", rest.strip())
    folder, model = match.groups() if match and not Path(rest.strip()).exists() else (rest.strip(), "hymirec")
    if model not in quality.MODELS:
        raise ValueError(f"step {text!r}: unknown model {model!r}; known: {list(quality.MODELS)}")
    return name.strip(), Path(folder), model, (base.strip() or None)


def load_step(name: str, folder: Path, model: str) -> dict[int, dict[str, Any]]:
    """The step's result files by seed; all seeds trained with the same settings."""
    files = sorted(folder.glob(f"{model}-seed*.json"))
    by_seed = {int(re.search(r"seed(\d+)", f.stem).group(1)): json.loads(f.read_text()) for f in files}
    if len(by_seed) < 2:
        raise ValueError(f"step {name!r}: {len(by_seed)} result file(s) of {model} in {folder}; a lever is "
                         "measured over several seeds (at least 2)")
    settings = {s: tuple(r.get("settings") or ()) for s, r in by_seed.items()}
    if len(set(settings.values())) > 1:
        raise ValueError(f"step {name!r}: the seeds in {folder} were trained with different settings {settings}")
    return by_seed


def per_user(name: str, by_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Users, targets, per-seed R@10/N@10 and each user's hit/NDCG averaged over seeds."""
    seeds = sorted(by_seed)
    orders, users = quality.aligned_by_user(by_seed, seeds, f"step {name!r}")
    targets = np.asarray(by_seed[seeds[0]]["target_ids"])[orders[seeds[0]]]
    for s in seeds[1:]:
        if not np.array_equal(np.asarray(by_seed[s]["target_ids"])[orders[s]], targets):
            raise ValueError(f"step {name!r}: seed {s} has other test targets than seed {seeds[0]}")
    hits, ndcgs = zip(*(quality.metrics_from_ranks(np.asarray(by_seed[s]["ranks"])[orders[s]]) for s in seeds))
    return {"seeds": seeds, "users": users, "targets": targets, "hits": np.array(hits), "ndcgs": np.array(ndcgs),
            "settings": list(by_seed[seeds[0]].get("settings") or []),
            "valid_n10": [by_seed[s].get("valid_n10") for s in seeds],
            "epochs": [[by_seed[s].get("epochs"), by_seed[s].get("best_epoch")] for s in seeds]}


def compare(steps: Sequence[tuple[str, dict[str, Any]]], reference: Optional[tuple[str, dict[str, Any]]],
            popularity: Optional[dict[str, int]] = None,
            bases: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """The levers summary: per step and slice mean/std, and intervals vs previous, first, reference.
    ``bases`` names, for a step, the earlier step it adds its lever to (default: the one before)."""
    everyone = [*steps, *([reference] if reference else [])]
    first_name, first = everyone[0]
    for name, step in everyone[1:]:
        if not np.array_equal(step["users"], first["users"]):
            raise ValueError(f"step {name!r} was evaluated on other test users than {first_name!r}")
        if not np.array_equal(step["targets"], first["targets"]):
            raise ValueError(f"step {name!r} has other test targets than {first_name!r} (another split?)")
    train_users = np.array([(popularity or {}).get(t, 0) for t in first["targets"]])
    masks = {prefix: np.array([quality.SLICES[prefix](n) for n in train_users], dtype=bool)
             for prefix in (SLICES if popularity is not None else ("",))}
    out: dict[str, Any] = {"k": quality.K, "steps": [], "reference": None,
                           "slices": {prefix.rstrip("_") or "all": int(mask.sum()) for prefix, mask in masks.items()}}

    def figures(step: dict[str, Any]) -> dict[str, Any]:
        valid = [v for v in step["valid_n10"] if v is not None]
        fig: dict[str, Any] = {"seeds": step["seeds"], "settings": step["settings"], "epochs": step["epochs"],
                               # what chooses a setting (the test split never does)
                               "valid_n10_mean": float(np.mean(valid)) if valid else None}
        for prefix, mask in masks.items():
            r, g = step["hits"][:, mask].mean(axis=1), step["ndcgs"][:, mask].mean(axis=1)
            fig[f"{prefix}r10_mean"], fig[f"{prefix}r10_std"] = float(r.mean()), float(r.std(ddof=1))
            fig[f"{prefix}n10_mean"], fig[f"{prefix}n10_std"] = float(g.mean()), float(g.std(ddof=1))
        return fig

    def intervals(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[float]]:
        return {f"{prefix}{metric}_ci": list(quality.paired_bootstrap_ci(a[key].mean(axis=0)[mask],
                                                                          b[key].mean(axis=0)[mask]))
                for prefix, mask in masks.items() for metric, key in (("r10", "hits"), ("n10", "ndcgs"))}

    earlier: dict[str, dict[str, Any]] = {}
    for i, (name, step) in enumerate(steps):
        entry = {"name": name, **figures(step)}
        if i:
            base = (bases or {}).get(name) or steps[i - 1][0]
            if base not in earlier:
                raise ValueError(f"step {name!r}: its base {base!r} is not an earlier step ({list(earlier)})")
            entry["previous"] = base
            entry["minus_previous"] = intervals(step, earlier[base])
            entry["minus_first"] = intervals(step, first)
        if reference:
            entry["minus_reference"] = intervals(step, reference[1])
        out["steps"].append(entry)
        earlier[name] = step
    if reference:
        out["reference"] = {"name": reference[0], **figures(reference[1])}
    return out


def table(summary: dict[str, Any]) -> str:
    """A markdown table: one row per step (and the reference), overall and long tail."""
    ref = summary["reference"]
    tail = "tail" in summary["slices"]
    head = ["step", "seeds", "valid N@10", "R@10 mean ± std", "N@10 mean ± std", "R@10 − previous, 95% CI",
            "N@10 − previous, 95% CI"]
    if ref:
        head += [f"R@10 − {ref['name']}, 95% CI", f"N@10 − {ref['name']}, 95% CI"]
    if tail:
        head += [f"long tail ({summary['slices']['tail']}) R@10"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def ci(entry: dict[str, Any], which: str, key: str) -> str:
        low, high = entry.get(which, {}).get(key, (None, None))
        return "—" if low is None else f"[{low:+.4f}, {high:+.4f}]"

    rows = [*summary["steps"], *([ref] if ref else [])]
    for i, entry in enumerate(rows):
        name = entry["name"]
        if entry.get("previous") and entry["previous"] != rows[i - 1]["name"]:
            name += f" (on {entry['previous']})"
        valid = "—" if entry.get("valid_n10_mean") is None else f"{entry['valid_n10_mean']:.4f}"
        row = [name, str(len(entry["seeds"])), valid, f"{entry['r10_mean']:.4f} ± {entry['r10_std']:.4f}",
               f"{entry['n10_mean']:.4f} ± {entry['n10_std']:.4f}", ci(entry, "minus_previous", "r10_ci"),
               ci(entry, "minus_previous", "n10_ci")]
        if ref:
            row += [ci(entry, "minus_reference", "r10_ci"), ci(entry, "minus_reference", "n10_ci")]
        if tail:
            row += [f"{entry['tail_r10_mean']:.4f} ± {entry['tail_r10_std']:.4f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--step", dest="steps", action="append", default=[], metavar="NAME=RUNS_DIR[:MODEL]")
    parser.add_argument("--reference", default="", metavar="NAME=RUNS_DIR[:MODEL]")
    parser.add_argument("--work", default="", help="a protocol work dir (its sequences give the slices)")
    parser.add_argument("--out", default="", help="default benchmarks/results/levers.json (levers-quick.json)")
    parser.add_argument("--quick", action="store_true", help="the default (it reads result files only)")
    args = parser.parse_args(argv)
    given = [*(f'--step "{x}"' for x in args.steps), *([f'--reference "{args.reference}"'] if args.reference else []),
             *([f"--work {args.work}"] if args.work else [])]
    if not args.steps:
        args.steps, args.reference = list(DEFAULT_STEPS), args.reference or DEFAULT_REFERENCE
    if len(args.steps) < 2:
        parser.error("give at least two --step (a lever is a step from one configuration to the next)")
    popularity = None
    if args.work:
        from hymirec_udfs.core.config import load_config
        from hymirec_udfs.core.spark import get_spark

        cfg = load_config(["local"], ["tracking.enabled=false", f"paths.work_dir={args.work}"])
        popularity = quality.training_popularity(get_spark(cfg), cfg)
    try:
        parsed = [parse_step(text) for text in args.steps]
        steps = [(name, per_user(name, load_step(name, folder, model))) for name, folder, model, _ in parsed]
        reference = None
        if args.reference:
            name, folder, model, _ = parse_step(args.reference)
            reference = (name, per_user(name, load_step(name, folder, model)))
        summary = compare(steps, reference, popularity, {name: base for name, _, _, base in parsed if base})
    except ValueError as err:
        parser.error(str(err))
    summary["command"] = " ".join(["python benchmarks/levers.py", *given])
    # --quick (make bench) never overwrites the committed table, which has the slices
    out = Path(args.out or RESULTS / ("levers-quick.json" if args.quick else "levers.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, sort_keys=True))
    print(table(summary))
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
