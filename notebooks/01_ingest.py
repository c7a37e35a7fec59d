# Databricks notebook source
# MAGIC %md
# MAGIC # 01 · Ingest
# MAGIC
# MAGIC Reads the raw catalog and interaction log (MovieLens-100K from the `recbole` wheel by default;
# MAGIC ml-1m or PixelRec-style CSV/Parquet via `ingest.*`) into the `items`, `interactions` and
# MAGIC `quarantine` tables.
# MAGIC
# MAGIC Calls `hymirec_udfs.stages.run_stage(spark, cfg, "ingest")`, the same function as
# MAGIC `jobs/ingest.py` and the `hymirec` CLI; the run is recorded in `job_runs` and MLflow.
# MAGIC
# MAGIC ## Widgets
# MAGIC
# MAGIC | widget | default | meaning |
# MAGIC | --- | --- | --- |
# MAGIC | `profile` | `databricks` | config profile(s), comma-separated: `conf/<name>.yaml` of the package, or YAML paths |
# MAGIC | `set` | empty | config overrides `key=value`, one per line or `;`-separated (e.g. `storage.schema=hymirec_dev`) |
# MAGIC | `run_date` | empty | logical run date, recorded as a tag (the job passes its start date) |

# COMMAND ----------

# Outside Databricks (a laptop, the tests) there is no `dbutils`: this stand-in reads each
# widget from the environment variable HYMIREC_WIDGET_<NAME> (e.g. HYMIREC_WIDGET_SET),
# falling back to the widget's default. On Databricks this cell does nothing.
if "dbutils" not in globals():
    import os as _os

    class _LocalWidgets:
        """The slice of `dbutils.widgets` these notebooks use."""

        def __init__(self) -> None:
            self._values: dict[str, str] = {}

        def text(self, name: str, default: str = "", label: str = "") -> None:
            self._values.setdefault(name, _os.environ.get(f"HYMIREC_WIDGET_{name.upper()}", default))

        def dropdown(self, name: str, default: str, choices: list, label: str = "") -> None:
            self.text(name, default, label)

        def get(self, name: str) -> str:
            return self._values[name]

    class _LocalDbutils:
        widgets = _LocalWidgets()

    dbutils = _LocalDbutils()

if "display" not in globals():
    def display(obj) -> None:
        """Local stand-in for Databricks' display()."""
        if hasattr(obj, "show"):
            obj.show(truncate=False)
        else:
            print(obj)

# COMMAND ----------

dbutils.widgets.text("profile", "databricks", "Config profile(s)")
dbutils.widgets.text("set", "", "Overrides key=value (newline or ; separated)")
dbutils.widgets.text("run_date", "", "Run date (YYYY-MM-DD)")

import os
import re

profile = dbutils.widgets.get("profile")
set_text = dbutils.widgets.get("set").strip()
# One override per line; on a single line, `;` separates them (a value holding `;` needs the
# one-per-line form).
overrides = [item.strip() for item in re.split(r"\n" if "\n" in set_text else ";", set_text) if item.strip()]
run_date = dbutils.widgets.get("run_date")
if run_date:
    os.environ["HYMIREC_RUN_DATE"] = run_date  # recorded as a tag, as `--run-date` does

# COMMAND ----------

from hymirec_udfs.cli import job_summary
from hymirec_udfs.config import load_config
from hymirec_udfs.spark import get_spark
from hymirec_udfs.stages import run_stage

cfg = load_config(profile, overrides)
spark = get_spark(cfg)  # on Databricks: the cluster's session
job = run_stage(spark, cfg, "ingest")

# COMMAND ----------

print(job_summary(job))
display(spark.createDataFrame(sorted(job.row_counts.items()), "name string, rows long"))
