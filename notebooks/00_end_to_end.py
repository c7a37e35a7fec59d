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

# Outside Databricks (a laptop, the tests) there is no `dbutils`: the package's stand-in
# reads each widget from the environment variable HYMIREC_WIDGET_<NAME>.
if "dbutils" not in globals():
    from hymirec_udfs.notebook import LocalDbutils, display

    dbutils = LocalDbutils()

# COMMAND ----------

from hymirec_udfs.notebook import config_from_widgets, declare_common_widgets

declare_common_widgets(dbutils)
dbutils.widgets.text("from_stage", "", "First stage")
dbutils.widgets.text("to_stage", "", "Last stage")
dbutils.widgets.dropdown("force", "false", ["false", "true"], "Force re-run")

cfg = config_from_widgets(dbutils)
from_stage = dbutils.widgets.get("from_stage") or None
to_stage = dbutils.widgets.get("to_stage") or None
force = dbutils.widgets.get("force").lower() == "true"

# COMMAND ----------

import time

from hymirec_udfs.cli import pipeline_summary
from hymirec_udfs.core.spark import get_spark
from hymirec_udfs.pipeline import run_pipeline

spark = get_spark(cfg)  # on Databricks: the cluster's session
started = time.perf_counter()
jobs = run_pipeline(spark, cfg, from_stage=from_stage, to_stage=to_stage, force=force)

# COMMAND ----------

print(pipeline_summary(jobs, time.perf_counter() - started))
display(spark.createDataFrame(
    [(j.stage, "skipped" if j.skipped else j.status, float(j.wall_s)) for j in jobs],
    "stage string, status string, wall_s double",
))
