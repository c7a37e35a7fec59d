# Databricks notebook source
# MAGIC %md
# MAGIC # 00 · End to end
# MAGIC
# MAGIC Runs the whole HyMiRec pipeline in this notebook's session with
# MAGIC `hymirec_udfs.stages.run_pipeline`, the same function as `hymirec pipeline run`: stages whose
# MAGIC inputs and config are unchanged since their last successful run are skipped, and a re-run
# MAGIC after a failure resumes at the failed stage. For production use the bundle's job
# MAGIC (`pipelines/databricks`), which runs each stage on the right cluster.
# MAGIC
# MAGIC ## Widgets
# MAGIC
# MAGIC | widget | default | meaning |
# MAGIC | --- | --- | --- |
# MAGIC | `profile` | `databricks` | config profile(s), comma-separated: `conf/<name>.yaml` of the package, or YAML paths |
# MAGIC | `set` | empty | config overrides `key=value`, one per line or `;`-separated (e.g. `storage.schema=hymirec_dev`) |
# MAGIC | `run_date` | empty | logical run date, recorded as a tag (the job passes its start date) |
# MAGIC | `from_stage` | empty | first stage to consider (stage or CLI name; empty: the first) |
# MAGIC | `to_stage` | empty | last stage to consider (empty: the last) |
# MAGIC | `force` | `false` | re-run stages even when their inputs and config are unchanged |

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
dbutils.widgets.text("from_stage", "", "First stage")
dbutils.widgets.text("to_stage", "", "Last stage")
dbutils.widgets.dropdown("force", "false", ["false", "true"], "Force re-run")

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
from_stage = dbutils.widgets.get("from_stage") or None
to_stage = dbutils.widgets.get("to_stage") or None
force = dbutils.widgets.get("force").lower() == "true"

# COMMAND ----------

import time

from hymirec_udfs.cli import pipeline_summary
from hymirec_udfs.config import load_config
from hymirec_udfs.spark import get_spark
from hymirec_udfs.stages import run_pipeline

cfg = load_config(profile, overrides)
spark = get_spark(cfg)  # on Databricks: the cluster's session
started = time.perf_counter()
jobs = run_pipeline(spark, cfg, from_stage=from_stage, to_stage=to_stage, force=force)

# COMMAND ----------

print(pipeline_summary(jobs, time.perf_counter() - started))
display(spark.createDataFrame(
    [(j.stage, "skipped" if j.skipped else j.status, float(j.wall_s)) for j in jobs],
    "stage string, status string, wall_s double",
))
