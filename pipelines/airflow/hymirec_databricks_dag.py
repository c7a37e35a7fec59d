"""Airflow DAG ``hymirec_databricks``: trigger the Databricks bundle's HyMiRec job.

The stages run as tasks of the job that ``pipelines/databricks`` deploys (notebooks on a
CPU job cluster, embedding and training on a GPU one); Airflow passes the logical date. A
failed Databricks run is first repaired in place, once (``repair_run``: its failed tasks
and the ones after them run again, the successful ones are kept); if the repair fails
too, Airflow's retries start a fresh run of the job.

**Trigger-only** (``schedule=None``): on Databricks the bundle's job schedule is the one
scheduler (``prod`` unpauses it), so the job never runs twice a day. Teams whose
orchestration lives in Airflow trigger this DAG (from another DAG, an asset, or by hand)
and leave the bundle's schedule paused (``schedule_pause_status: PAUSED``).

The operator is **deferrable**: while the job runs (hours), the wait happens in Airflow's
triggerer, not in a worker slot.

The job is found by name through the ``databricks_default`` connection (host + token or
service principal); the name is the deployment's, from the Variable
``hymirec_databricks_job_name`` (default ``hymirec``, what ``databricks bundle deploy -t
prod`` creates; a dev deployment prefixes it, ``[dev <user>] hymirec``). It is not a
trigger param: whoever may trigger the DAG cannot point it at another job.
"""

from __future__ import annotations

import datetime as dt

from airflow.providers.databricks.operators.databricks import DatabricksRunNowOperator
from airflow.sdk import DAG

DAG_ID = "hymirec_databricks"
DATABRICKS_CONN_ID = "databricks_default"

with DAG(
    dag_id=DAG_ID,
    description="HyMiRec on Databricks: run the bundle's job (one task per stage)",
    schedule=None,  # the bundle's job schedule is the scheduler on Databricks (see above)
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args={
        "owner": "hymirec",
        "retries": 2,
        "retry_delay": dt.timedelta(minutes=10),
    },
    tags=["hymirec", "databricks"],
    doc_md=__doc__,
) as dag:
    DatabricksRunNowOperator(
        task_id="run_hymirec_job",
        databricks_conn_id=DATABRICKS_CONN_ID,
        job_name="{{ var.value.get('hymirec_databricks_job_name', 'hymirec') }}",
        # Only the date: the job's other parameters (profile, catalog/schema overrides)
        # are the deployment's, set per target in the bundle.
        job_parameters={"run_date": "{{ ds }}"},
        forward_dag_params=False,
        repair_run=True,
        deferrable=True,
        execution_timeout=dt.timedelta(hours=12),
    )
