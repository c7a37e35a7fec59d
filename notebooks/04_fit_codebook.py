# Databricks notebook source
# MAGIC %md
# MAGIC # 04 · Fit the codebook
# MAGIC
# MAGIC Fits the cosine residual codebook on a basepool sample of `item_embeddings` into `codebooks`
# MAGIC (and an MLflow artifact).
# MAGIC
# MAGIC Calls `hymirec_udfs.pipeline.run_stage(spark, cfg, "fit_codebook")`, the same function as
# MAGIC `jobs/fit_codebook.py` and the `hymirec` CLI; the run is recorded in `job_runs` and MLflow.
# MAGIC
# MAGIC ## Widgets
# MAGIC
# MAGIC | widget | default | meaning |
# MAGIC | --- | --- | --- |
# MAGIC | `profile` | `databricks` | config profile(s), comma-separated: `conf/<name>.yaml` of the package, or YAML paths |
# MAGIC | `set` | empty | config overrides `key=value`, one per line or `;`-separated (e.g. `storage.schema=hymirec_dev`) |
# MAGIC | `run_date` | empty | logical run date, recorded as a tag (the job passes its start date) |

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
job = run_stage(spark, cfg, "fit_codebook")

# COMMAND ----------

print(job_summary(job))
display(spark.createDataFrame(sorted(job.row_counts.items()), "name string, rows long"))
