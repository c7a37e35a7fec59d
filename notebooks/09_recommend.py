# Databricks notebook source
# MAGIC %md
# MAGIC # 09 · Recommend
# MAGIC
# MAGIC For every user, the served model's interest embeddings and top-K items from today's
# MAGIC catalog; writes `user_interests` and `recommendations` for the run's as-of date
# MAGIC (`run_date`; a re-run of a date replaces that date only).
# MAGIC
# MAGIC Calls `hymirec_udfs.pipeline.run_stage(spark, cfg, "recommend")`, the same function as
# MAGIC `jobs/recommend.py` and the `hymirec` CLI; the run is recorded in `job_runs` and MLflow.
# MAGIC
# MAGIC ## Widgets
# MAGIC
# MAGIC | widget | default | meaning |
# MAGIC | --- | --- | --- |
# MAGIC | `profile` | `databricks` | config profile(s), comma-separated: `conf/<name>.yaml` of the package, or YAML paths |
# MAGIC | `set` | empty | config overrides `key=value`, one per line or `;`-separated (e.g. `storage.schema=hymirec_dev`) |
# MAGIC | `run_date` | empty | the as-of date of the outputs (the job passes its start date; empty: today) |

# COMMAND ----------

# Outside Databricks (a laptop, the tests) there is no `dbutils`: the package's stand-in
# reads each widget from the environment variable HYMIREC_WIDGET_<NAME>.
if "dbutils" not in globals():
    from hymirec_udfs.notebook import LocalDbutils, display

    dbutils = LocalDbutils()

# COMMAND ----------

from hymirec_udfs.notebook import config_from_widgets, declare_common_widgets

declare_common_widgets(dbutils)

cfg = config_from_widgets(dbutils)

# COMMAND ----------

from hymirec_udfs.cli import job_summary
from hymirec_udfs.core.spark import get_spark
from hymirec_udfs.pipeline import run_stage

spark = get_spark(cfg)  # on Databricks: the cluster's session
job = run_stage(spark, cfg, "recommend")

# COMMAND ----------

print(job_summary(job))
display(spark.createDataFrame(sorted(job.row_counts.items()), "name string, rows long"))

# COMMAND ----------

# A sample: a user's most recent titles and each interest's top titles for this date.
from hymirec_udfs.recommend.sample import sample_text

print(sample_text(spark, cfg, job.summary["as_of_date"]))
