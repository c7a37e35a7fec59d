"""Airflow DAG ``hymirec_databricks``: trigger the Databricks bundle's HyMiRec job, daily.

The stages run as tasks of the job that ``pipelines/databricks`` deploys (notebooks on a
CPU job cluster, embedding and training on a GPU one); Airflow owns the schedule and
passes the logical date. A failed Databricks run is first repaired in place, once
(``repair_run``: its failed tasks and the ones after them run again, the successful ones
are kept); if the repair fails too, Airflow's retries start a fresh run of the job.

The job is found by name through the ``databricks_default`` connection (host + token or
service principal). ``databricks bundle deploy -t prod`` names it ``hymirec``; a dev
deployment prefixes it (``[dev <user>] hymirec``), so trigger with ``job_name`` set to
that to run a dev copy.
"""

from __future__ import annotations

import datetime as dt

from airflow.providers.databricks.operators.databricks import DatabricksRunNowOperator
from airflow.sdk import DAG, Param

DAG_ID = "hymirec_databricks"
DATABRICKS_CONN_ID = "databricks_default"

with DAG(
    dag_id=DAG_ID,
    description="HyMiRec on Databricks: run the bundle's job (one task per stage)",
    schedule="@daily",
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args={
        "owner": "hymirec",
        "retries": 2,
        "retry_delay": dt.timedelta(minutes=10),
    },
    params={
        "job_name": Param("hymirec", type="string", description="name of the deployed Databricks job"),
    },
    tags=["hymirec", "databricks"],
    doc_md=__doc__,
) as dag:
    DatabricksRunNowOperator(
        task_id="run_hymirec_job",
        databricks_conn_id=DATABRICKS_CONN_ID,
        job_name="{{ params.job_name }}",
        # Only the date: the job's other parameters (profile, catalog/schema overrides)
        # are the deployment's, set per target in the bundle.
        job_parameters={"run_date": "{{ ds }}"},
        forward_dag_params=False,
        repair_run=True,
        execution_timeout=dt.timedelta(hours=12),
    )
