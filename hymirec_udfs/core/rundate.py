"""The run date: ``--run-date D`` means "the world as of the end of D" (UTC).

One place for it: the CLI (``--run-date``), the notebooks (the ``run_date`` widget), the
Airflow DAGs (``{{ ds }}``) and the Databricks bundle parameter all set
``HYMIREC_RUN_DATE``; the stages ask :func:`run_date` / :func:`as_of_date`.

With a run date, ``build_sequences`` keeps interactions with ``timestamp <`` the end of D
(:func:`cutoff_epoch`), so training, evaluation and recommendations see nothing later;
incremental ingestion reads D's increment; the serving tables are written for D. Without
one, every interaction is used and the serving tables are dated today (UTC).
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Optional

ENV = "HYMIREC_RUN_DATE"


class RunDateError(ValueError):
    """``--run-date`` / ``HYMIREC_RUN_DATE`` is not a YYYY-MM-DD date."""


def run_date() -> Optional[dt.date]:
    """The run date given to this process (None when none was given)."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        return dt.date.fromisoformat(raw)
    except ValueError:
        raise RunDateError(f"--run-date {raw!r} (HYMIREC_RUN_DATE) is not a date (YYYY-MM-DD)") from None


def as_of_date() -> dt.date:
    """The run date, else today (UTC): the date serving tables are written for."""
    return run_date() or dt.datetime.now(dt.timezone.utc).date()


def day_start_epoch(day: dt.date) -> int:
    """Epoch seconds of 00:00 UTC on ``day``."""
    return int(dt.datetime.combine(day, dt.time(), tzinfo=dt.timezone.utc).timestamp())


def cutoff_epoch(day: dt.date) -> int:
    """First epoch second *after* ``day`` (UTC): interactions before it are "as of D"."""
    return day_start_epoch(day + dt.timedelta(days=1))


def fingerprint(cfg: object = None) -> str:
    """Skip-check key of a stage whose output depends on the run date ('' without one)."""
    day = run_date()
    return f"asof-{day.isoformat()}" if day else ""
