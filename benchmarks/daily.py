"""Daily runs: incremental day against a full re-run, aligned against unaligned refits,
and the champion on stale codes against after a refit under a constructed drift.

Usage (from the repository root)::

    python benchmarks/daily.py [--quick] [--users N] [--days N] [--profile local,daily]

One process, one local Spark session. MovieLens-100K is cut into a bootstrap increment
and ``--days`` daily ones (:func:`hymirec_udfs.schedule.write_increments`); the last day
also brings 60 out-of-domain items (hardware products) that some users interact with.

* ``incremental_speedup``: wall time of a full pipeline run on the data as of the last
  ordinary day (a fresh work dir, everything in one increment, training from scratch)
  divided by the schedule's incremental run of that day (new items only, warm start);
* ``codes_unchanged_aligned``: after the drift day's refit (warm-started, Hungarian
  aligned), the share of the earlier catalog whose whole code tuple is unchanged;
  ``codes_unchanged_unaligned``: the same for a cold refit (k-means++ from another seed,
  no alignment) of the same tables;
* ``r10_stale_codes``: test R@10 on the drift day with the codebook pinned
  (``codebook.refit=never``: the new items encoded with the stale codebook, the champion
  fine-tuned), from a copy of the work dir taken before the drift day;
  ``r10_after_refit``: the schedule's drift day (aligned refit, full retraining).

R@10 here is one run on the test users of the subset: compare it with the seed spread
(+-0.013 R@10 on the whole of ML-100K, more on a subset), not as a significant difference.

Writes ``benchmarks/results/daily.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

RESULTS = REPO_ROOT / "benchmarks" / "results" / "daily.json"


def _with(cfg, **sections):
    """``cfg`` with fields of sections replaced: ``_with(cfg, codebook={"refit": "never"})``."""
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **values)
                                       for name, values in sections.items()})


def _one_increment(src: Path, dst: Path, dates: list[dt.date]) -> None:
    """Every increment up to ``dates[-1]`` as one increment dated ``dates[-1]``."""
    import pandas as pd

    folder = dst / dates[-1].isoformat()
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("items.csv", "interactions.csv"):
        frames = [pd.read_csv(src / d.isoformat() / name, dtype=str, keep_default_na=False) for d in dates]
        pd.concat(frames).to_csv(folder / name, index=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ci-tiny model, 120 users")
    parser.add_argument("--users", type=int, default=0, help="first N users (default: all 943)")
    parser.add_argument("--days", type=int, default=3, help="days after the bootstrap (the last one drifts)")
    parser.add_argument("--profile", default="local,daily")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    profiles = "ci-tiny,daily" if args.quick else args.profile
    users = 120 if args.quick and not args.users else args.users

    from pyspark.sql import functions as F

    from hymirec_udfs.core import schemas
    from hymirec_udfs.core.config import load_config
    from hymirec_udfs.core.lineage import last_success
    from hymirec_udfs.core.spark import get_spark
    from hymirec_udfs.core.tables import get_table_store
    from hymirec_udfs.pipeline import run_stage
    from hymirec_udfs.schedule import HEADER, format_day, run_day, write_increments

    base = Path(tempfile.mkdtemp(prefix="hymirec-daily-"))
    cfg = load_config(profiles.split(","), [f"paths.work_dir={base / 'schedule'}",
                                           f"ingest.data_dir={base / 'increments'}"])
    spark = get_spark(cfg)
    dates = write_increments(base / "increments", days=args.days, users=users, drift_day=args.days)
    reports = []
    for i, day in enumerate(dates):
        if i == len(dates) - 1:  # before the drift day: a copy to replay it with the codebook pinned
            shutil.copytree(base / "schedule", base / "stale", symlinks=True)
        print(f"== {day} ==", flush=True)
        reports.append(run_day(spark, cfg, day, echo=lambda line: print(line, flush=True)))
    store = get_table_store(spark, cfg)
    encode = json.loads(last_success(store, "encode_items")["summary"])
    aligned, parent = encode.get("codes_unchanged"), encode.get("parent_version")

    # a cold, unaligned refit of the same tables, compared with the same parent codebook
    import os

    os.environ["HYMIREC_RUN_DATE"] = dates[-1].isoformat()
    cold = _with(cfg, codebook={"refit": "always", "warm_start": False, "seed": cfg.codebook.seed + 1,
                                "prune_codes": False})  # the parent's codes are compared below
    run_stage(spark, cold, "fit-codebook")
    run_stage(spark, cold, "encode")
    newest = json.loads(last_success(store, "encode_items")["summary"])["version"]
    codes = store.read(schemas.ITEM_CODES)
    unaligned = (codes.where(F.col("codebook_version") == newest).alias("n")
                 .join(codes.where(F.col("codebook_version") == parent).alias("o"), schemas.ITEM_ID)
                 .agg(F.avg((F.col("n.codes") == F.col("o.codes")).cast("double"))).first()[0])
    os.environ.pop("HYMIREC_RUN_DATE")

    # the drift day again with the codebook pinned (stale codes), from the copy
    stale_cfg = _with(cfg, paths={"work_dir": str(base / "stale")}, codebook={"refit": "never"})
    print("== drift day with the codebook pinned ==", flush=True)
    stale = run_day(spark, stale_cfg, dates[-1], echo=lambda line: print(line, flush=True))

    # a full re-run on the data as of the last ordinary day
    _one_increment(base / "increments", base / "full-increments", dates[:-1])
    full_cfg = _with(cfg, paths={"work_dir": str(base / "full")}, ingest={"data_dir": str(base / "full-increments")},
                     train={"warm_start": "never"})
    print("== full re-run as of the last ordinary day ==", flush=True)
    full = run_day(spark, full_cfg, dates[-2], echo=lambda line: print(line, flush=True))
    incremental = reports[-2]

    print(HEADER)
    for r in reports:
        print(format_day(r))
    print("stale  " + format_day(stale))
    print("full   " + format_day(full))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO_ROOT).stdout.strip()
    result = {
        "date": dt.date.today().isoformat(), "commit": commit, "host": f"{platform.node()} ({os.cpu_count()} cores)",
        "profile": profiles, "users": users or 943, "days": args.days, "dates": [d.isoformat() for d in dates],
        "schedule": [dataclasses.asdict(r) for r in reports],
        "incremental_wall_s": incremental.wall_s, "full_wall_s": full.wall_s,
        "incremental_speedup": full.wall_s / incremental.wall_s,
        "incremental_r10": incremental.r10, "full_rerun_r10": full.r10,
        "codes_unchanged_aligned": aligned, "codes_unchanged_unaligned": unaligned,
        "drift_score": reports[-1].drift, "r10_stale_codes": stale.r10, "r10_after_refit": reports[-1].r10,
        "stale_training": stale.training,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "schedule"}, indent=2, default=str))
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
