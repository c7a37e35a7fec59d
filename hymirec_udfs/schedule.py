"""``hymirec schedule simulate``: MovieLens-100K replayed as a daily schedule.

The interaction log is cut at day boundaries into a bootstrap slice (the first
``bootstrap_share`` of the interactions) and ``days`` later slices of about equal size; each
slice becomes a dated increment (``<dir>/<YYYY-MM-DD>/items.csv`` holding the items first
seen that day, ``interactions.csv`` that day's interactions), exactly what an upstream
export would drop daily. Then the pipeline runs once per date with ``--run-date`` and
``ingest.mode=incremental`` (profile ``daily``), and one line per day reports what the
daily machinery did: new items, items embedded and encoded, the drift score, whether the
codebook was refit, the training mode, the wall time and the test R@10.

``drift_day`` adds a constructed drift on that day: items from another text domain
(hardware products, not films) that some users interact with, which must trip the drift
score. ``remove_day`` marks the most popular item of the catalog removed that day.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from hymirec_udfs.core import rundate

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

    from hymirec_udfs.core.config import Config

_PRODUCTS = ["cordless drill", "torque wrench", "pipe fitting", "circuit breaker", "garden hose", "paint roller",
             "ceiling fan", "door hinge", "socket set", "wall anchor", "ladder", "extension cord", "sandpaper",
             "caulk gun", "shop vacuum", "tile cutter"]
_SPECS = ["18V lithium", "stainless steel", "3/4 inch brass", "20 amp", "50 ft rubber", "9 inch nap",
          "52 inch 3-blade", "zinc plated", "metric 40-piece", "plastic 100-pack", "aluminium 6 ft", "12 gauge",
          "220 grit", "drip-free", "5 gallon wet/dry", "manual 24 inch"]


@dataclass
class DayReport:
    """One line of the simulated schedule."""

    date: str
    new_items: int
    embedded: int
    encoded: int
    drift: Optional[float]
    refit: str
    training: str
    wall_s: float
    r10: Optional[float]


def write_increments(out_dir: Path, *, days: int, users: int = 0, drift_day: int = 0, remove_day: int = 0,
                     bootstrap_share: float = 0.6, drift_items: int = 60) -> list[dt.date]:
    """Cut MovieLens-100K (the recbole copy) into dated increments under ``out_dir``.

    Args:
        out_dir: where ``<date>/items.csv`` and ``<date>/interactions.csv`` go.
        days: increments after the bootstrap one.
        users: keep the first ``users`` user ids (0: all 943).
        drift_day: 1-based day that also brings ``drift_items`` out-of-domain items (0: none).
        remove_day: 1-based day that removes the most interacted item (0: none).
        bootstrap_share: share of the interactions in the bootstrap increment.

    Returns:
        The run dates, bootstrap first.
    """
    import numpy as np
    import pandas as pd

    from hymirec_udfs.ingest.sources import recbole_ml100k_dir

    base = recbole_ml100k_dir()
    items = pd.read_csv(base / "ml-100k.item", sep="\t", dtype=str).fillna("")
    items.columns = ["item_id", "title", "year", "genres"]
    inter = pd.read_csv(base / "ml-100k.inter", sep="\t", dtype=str)
    inter.columns = ["user_id", "item_id", "rating", "timestamp"]
    inter["ts"] = inter["timestamp"].astype(float).astype(np.int64)
    inter["order"] = np.arange(len(inter))
    if users:
        keep = sorted(inter["user_id"].unique(), key=int)[:users]
        inter = inter[inter["user_id"].isin(keep)]
    inter = inter.sort_values(["ts", "order"], kind="stable")
    day_of = pd.to_datetime(inter["ts"], unit="s", utc=True).dt.date
    cuts = [bootstrap_share + (1 - bootstrap_share) * i / days for i in range(days)] + [1.0]
    ends = sorted({day_of.iloc[min(len(inter) - 1, int(q * len(inter)) - 1)] for q in cuts})
    items = items.set_index("item_id")
    popular = inter["item_id"].value_counts().index[0]
    seen: set[str] = set()
    dates = []
    start = None
    rng = np.random.default_rng(0)
    for n, end in enumerate(ends):
        part = inter[(day_of <= end) & ((day_of > start) if start is not None else True)]
        start = end
        new_ids = [i for i in dict.fromkeys(part["item_id"]) if i not in seen]
        seen.update(new_ids)
        rows = pd.DataFrame({"item_id": new_ids, "title": [items.at[i, "title"] for i in new_ids],
                             "description": [f"Released in {items.at[i, 'year']}" if items.at[i, "year"] else ""
                                             for i in new_ids],
                             "tag": [", ".join(items.at[i, "genres"].split()) for i in new_ids], "removed": ""})
        out_inter = part[["user_id", "item_id", "timestamp", "rating"]].copy()
        out_inter["timestamp"] = part["ts"].astype(str)
        if drift_day and n == drift_day:
            drift = pd.DataFrame({
                "item_id": [f"hw{j}" for j in range(drift_items)],
                "title": [f"{_SPECS[j % len(_SPECS)]} {_PRODUCTS[(j * 7) % len(_PRODUCTS)]}"
                          for j in range(drift_items)],
                "description": [f"Hardware store SKU {10000 + j}, ships in 2 days" for j in range(drift_items)],
                "tag": "Tools, Home improvement", "removed": ""})
            day_start = rundate.day_start_epoch(end)
            buyers = rng.choice(sorted(part["user_id"].unique()), size=2 * drift_items)
            out_inter = pd.concat([out_inter, pd.DataFrame({
                "user_id": buyers, "item_id": [f"hw{j % drift_items}" for j in range(2 * drift_items)],
                "timestamp": [str(day_start + 60 * j) for j in range(2 * drift_items)], "rating": "4"})])
            rows = pd.concat([rows, drift])
        if remove_day and n == remove_day:
            title = items.at[popular, "title"]
            rows = pd.concat([rows, pd.DataFrame({"item_id": [popular], "title": [title], "description": [""],
                                                  "tag": [""], "removed": ["1"]})])
        folder = out_dir / end.isoformat()
        folder.mkdir(parents=True, exist_ok=True)
        rows.to_csv(folder / "items.csv", index=False)
        out_inter.to_csv(folder / "interactions.csv", index=False)
        dates.append(end)
    return dates


def with_increments(cfg: "Config") -> "Config":
    """``cfg`` in incremental mode, its increments under ``ingest.data_dir`` (default
    ``<work_dir>/increments``)."""
    import dataclasses

    data_dir = cfg.ingest.data_dir or str(cfg.work_dir / "increments")
    return dataclasses.replace(cfg, ingest=dataclasses.replace(cfg.ingest, data_dir=data_dir, mode="incremental"))


def run_day(spark: "SparkSession", cfg: "Config", day: dt.date, *, echo: Callable[[str], None] = print,
            stages: Optional[list[str]] = None) -> DayReport:
    """Run the pipeline for ``day`` (``--run-date``) and summarise what it did."""
    from hymirec_udfs.pipeline import run_pipeline

    cfg = with_increments(cfg)
    previous = os.environ.get(rundate.ENV)
    os.environ[rundate.ENV] = day.isoformat()
    t0 = time.perf_counter()
    try:
        jobs = {j.stage: j for j in run_pipeline(spark, cfg, echo=echo, stages=stages)}
    finally:
        if previous is None:
            os.environ.pop(rundate.ENV, None)
        else:
            os.environ[rundate.ENV] = previous

    def got(stage: str, kind: str, key: str, default: Any = None) -> Any:
        job = jobs.get(stage)
        if job is None or job.skipped:
            return default
        return (job.row_counts if kind == "rows" else job.summary).get(key, default)

    fit = jobs.get("fit_codebook")
    refit = "skipped" if fit is None or fit.skipped else ("yes" if fit.summary.get("refit") else "no")
    return DayReport(
        date=day.isoformat(),
        new_items=int(got("ingest", "rows", "new_items", 0)),
        embedded=int(got("embed_items", "rows", "embedded", 0)),
        encoded=int(got("encode_items", "rows", "encoded", 0)),
        drift=got("fit_codebook", "summary", "health_drift_score"),
        refit=refit,
        training=got("train", "summary", "training_mode", "skipped"),
        wall_s=time.perf_counter() - t0,
        r10=got("evaluate", "summary", f"{cfg.train.model_type}.test.recall@10"),
    )


HEADER = f"{'date':<11} {'new items':>9} {'embedded':>8} {'encoded':>7} {'drift':>7} {'refit':>5} " \
         f"{'training':>10} {'wall s':>7} {'test R@10':>9}"


def format_day(r: DayReport) -> str:
    drift = "-" if r.drift is None else f"{r.drift:.3f}"
    r10 = "-" if r.r10 is None else f"{r.r10:.4f}"
    return (f"{r.date:<11} {r.new_items:>9,} {r.embedded:>8,} {r.encoded:>7,} {drift:>7} {r.refit:>5} "
            f"{r.training:>10} {r.wall_s:>7.1f} {r10:>9}")


def simulate(spark: "SparkSession", cfg: "Config", *, days: int, users: int = 0, drift_day: int = 0,
             remove_day: int = 0, echo: Callable[[str], None] = print) -> list[DayReport]:
    """Write the increments under ``ingest.data_dir`` (``<work_dir>/increments`` when empty)
    and run the schedule day by day; returns one report per day."""
    cfg = with_increments(cfg)
    dates = write_increments(Path(cfg.ingest.data_dir), days=days, users=users, drift_day=drift_day,
                             remove_day=remove_day)
    reports = []
    for day in dates:
        echo(f"== run date {day} ==")
        reports.append(run_day(spark, cfg, day, echo=echo))
    echo(HEADER)
    for r in reports:
        echo(format_day(r))
    return reports
