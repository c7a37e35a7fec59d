"""Airflow DAG ``hymirec``: the HyMiRec pipeline as one spark-submit per stage, daily.

Each task runs ``spark-submit jobs/<stage>.py --profile <profile> --run-date {{ ds }}``
through the ``spark_default`` connection (master, deploy mode and queue live there), the
same entry points as a hand-run spark-submit. Each stage writes its tables atomically and
appends a ``job_runs`` row, so a retry (or a backfill) simply runs the stage again.

Chain::

    ingest >> stage1_gate >> train_content_encoder >> embed_items >> fit_codebook
           >> encode_items >> build_sequences >> train >> evaluate >> recommend
    ingest >> embed_items            (embed_items runs when stage 1 is skipped)

Where things come from: per deployment, from Airflow Variables (set by whoever deploys the
DAG), else the defaults below. **No trigger param reaches ``application``, ``py_files`` or
``conf``**: whoever may trigger the DAG chooses only the profile name (letters, digits and
dashes, no paths), the stage-1 switch and the date, never which script, wheel or Spark
settings run with the Spark connection's identity.

* ``jobs/`` directory: Variable ``hymirec_jobs_dir``, else ``/opt/hymirec/jobs`` (a checkout
  or a copy of the repository's ``jobs/``).
* the package: Variable ``hymirec_wheel``, else
  ``/opt/hymirec/dist/hymirec-0.1.0-py3-none-any.whl`` (``make wheel``), shipped with
  ``--py-files`` so drivers and executors import the release the DAG names. Its
  dependencies (torch, transformers, deltalake, mlflow ...) must be in the cluster's
  Python: install them on the nodes, or ship a packed venv with ``spark.archives``.
* GPU tasks (embed, stage 1, train): Variable ``hymirec_gpu_executors`` (default 4: one
  executor per GPU, and ``train.num_processes`` is set to the same number, so the barrier
  stage always has its slots), ``hymirec_gpu_executor_cores`` (default 8: ``spark.executor.cores``
  and ``spark.task.cpus`` alike, one task per executor with all its cores for the data
  loader), and the discovery script ``hymirec_gpu_discovery_script``, else the one Spark
  ships (``$SPARK_HOME/examples/src/main/scripts/getGpusResources.sh`` at ``/opt/spark``).
  Dynamic allocation is off for them: Spark refuses barrier stages under it (the default
  on EMR and Dataproc).

Scheduling: this DAG is the scheduler of a spark-submit deployment (YARN, Kubernetes,
standalone). On Databricks the bundle's job schedule is (``hymirec_databricks_dag.py`` is
trigger-only, for teams that chain it from other DAGs) — one scheduler per target.
"""

from __future__ import annotations

import datetime as dt

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import DAG, Param, TriggerRule, task

DAG_ID = "hymirec"
SPARK_CONN_ID = "spark_default"

# (task id = stage name, job file in jobs/, uses GPUs); pipeline order. The optional
# stage-1 content encoder is wired separately (it sits behind a gate).
STAGES: tuple[tuple[str, str, bool], ...] = (
    ("ingest", "ingest.py", False),
    ("embed_items", "embed_items.py", True),
    ("fit_codebook", "fit_codebook.py", False),
    ("encode_items", "encode_items.py", False),
    ("build_sequences", "build_sequences.py", False),
    ("train", "train.py", True),
    ("evaluate", "evaluate.py", False),
    ("recommend", "recommend.py", False),
)
STAGE1 = ("train_content_encoder", "train_content_encoder.py", True)

# Deployment settings come from Variables only (see the module docstring), never params.
JOBS_DIR = "{{ var.value.get('hymirec_jobs_dir', '/opt/hymirec/jobs') }}"
WHEEL = "{{ var.value.get('hymirec_wheel', '/opt/hymirec/dist/hymirec-0.1.0-py3-none-any.whl') }}"
GPU_DISCOVERY_SCRIPT = (
    "{{ var.value.get('hymirec_gpu_discovery_script', "
    "'/opt/spark/examples/src/main/scripts/getGpusResources.sh') }}"
)
GPU_EXECUTORS = "{{ var.value.get('hymirec_gpu_executors', '4') }}"
GPU_EXECUTOR_CORES = "{{ var.value.get('hymirec_gpu_executor_cores', '8') }}"
#: a profile is a name of conf/<name>.yaml in the wheel (comma-separated), never a path
PROFILE_PATTERN = r"^[A-Za-z0-9_-]+(,[A-Za-z0-9_-]+)*$"

# Settings every stage gets. Python workers are reused so the embedding model and the
# codebook are loaded once per worker, not once per batch.
BASE_CONF: dict[str, str] = {
    "spark.python.worker.reuse": "true",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.session.timeZone": "UTC",
}
# One task per GPU, one GPU per executor: the embedding UDF loads one model per GPU and
# TorchDistributor gives each DDP rank its own device.
GPU_CONF: dict[str, str] = {
    "spark.executor.resource.gpu.amount": "1",
    "spark.task.resource.gpu.amount": "1",
    "spark.executor.resource.gpu.discoveryScript": GPU_DISCOVERY_SCRIPT,
    # Barrier stages (TorchDistributor) are refused under dynamic allocation, and need all
    # their executors up front: a fixed number, one task (all cores) per executor.
    "spark.dynamicAllocation.enabled": "false",
    "spark.executor.instances": GPU_EXECUTORS,
    "spark.executor.cores": GPU_EXECUTOR_CORES,
    "spark.task.cpus": GPU_EXECUTOR_CORES,
}
#: stages that train with TorchDistributor: their process count is the GPU executors'
DISTRIBUTED = {"train", "train_content_encoder"}


def application_args(task_id: str = "") -> list[str]:
    """Arguments of a job: profile, the stage-1 switch and Airflow's logical date (and, for
    the distributed trainings, one process per GPU executor)."""
    args = [
        "--profile", "{{ params.profile }}",
        "--set", "stage1.enabled={{ params.stage1 | lower }}",
        "--run-date", "{{ ds }}",
    ]
    if task_id in DISTRIBUTED:
        args[4:4] = ["--set", f"train.num_processes={GPU_EXECUTORS}"]
    return args


def spark_stage(task_id: str, job_file: str, gpu: bool, **kwargs: object) -> SparkSubmitOperator:
    """One stage as a spark-submit of ``jobs/<job_file>`` with the package wheel shipped."""
    return SparkSubmitOperator(
        task_id=task_id,
        conn_id=SPARK_CONN_ID,
        application=f"{JOBS_DIR}/{job_file}",
        application_args=application_args(task_id),
        py_files=WHEEL,
        conf={**BASE_CONF, **(GPU_CONF if gpu else {})},
        name=f"hymirec-{task_id}-{{{{ ds_nodash }}}}",
        execution_timeout=dt.timedelta(hours=8 if gpu else 2),
        **kwargs,
    )


with DAG(
    dag_id=DAG_ID,
    description="HyMiRec: ingest, embed, codebook, sequences, train, evaluate, recommend (spark-submit per stage)",
    schedule="@daily",
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    # Stages overwrite shared tables: two runs at once would race on them.
    max_active_runs=1,
    default_args={
        "owner": "hymirec",
        "retries": 2,
        "retry_delay": dt.timedelta(minutes=10),
        "retry_exponential_backoff": True,
        "max_retry_delay": dt.timedelta(hours=1),
    },
    params={
        "profile": Param("cluster", type="string", pattern=PROFILE_PATTERN,
                         description="config profile name(s), comma-separated (conf/<name>.yaml in the wheel)"),
        "stage1": Param(False, type="boolean",
                        description="fine-tune the content encoder (stage 1) before embedding"),
    },
    tags=["hymirec", "spark"],
    doc_md=__doc__,
) as dag:

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def stage1_gate(params: dict | None = None) -> bool:
        """Skip the stage-1 task unless the run asks for it; the stages after it still run."""
        return bool((params or {}).get("stage1"))

    # embed_items runs after ingest, and after stage 1 when that ran; not after a failed
    # stage 1 (NONE_FAILED: a skipped upstream is fine, a failed one is not).
    tasks = {
        name: spark_stage(name, job, gpu, **({"trigger_rule": TriggerRule.NONE_FAILED} if name == "embed_items" else {}))
        for name, job, gpu in STAGES
    }
    content_encoder = spark_stage(*STAGE1)

    tasks["ingest"] >> stage1_gate() >> content_encoder >> tasks["embed_items"]
    tasks["ingest"] >> tasks["embed_items"]
    names = [name for name, _, _ in STAGES]
    for upstream, downstream in zip(names[1:], names[2:]):
        tasks[upstream] >> tasks[downstream]
