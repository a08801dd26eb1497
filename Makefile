# The two commands a fresh machine needs: `make demo` and `make test`.
PY := .venv/bin/python
STAMP := .cache/setup.stamp
# The demo's training budget in minutes (shown in the README).
DEMO_TRAIN_MINUTES ?= 4
STORAGE ?= local

.PHONY: setup demo test soak cluster-up cluster-down executor-env clean

setup: $(STAMP)

$(STAMP): scripts/setup.sh pyproject.toml conf/hadoop/pom.xml
	bash scripts/setup.sh
	@touch $@

# SECURE=1 also starts a Kerberized HDFS with its own KDC beside it (scripts/secure_cluster.py).
cluster-up: setup
	$(PY) -m scripts.devcluster up
	@if [ "$(SECURE)" = 1 ]; then $(PY) -m scripts.secure_cluster up; fi

cluster-down:
	@if [ -x $(PY) ]; then $(PY) -m scripts.secure_cluster down; $(PY) -m scripts.devcluster down; fi

# The Python environment for Spark executors on YARN (--archives); see scripts/executor_env.py.
executor-env: setup
	$(PY) -m scripts.executor_env

demo: setup
	$(PY) -m scripts.demo --storage $(STORAGE) --train-minutes $(DEMO_TRAIN_MINUTES)

# Starts the local HDFS + Spark cluster, runs the suite, stops the cluster even on failure.
test: setup
	@$(PY) -m scripts.devcluster up || { $(PY) -m scripts.devcluster down; exit 2; }
	@. .devcluster/env.sh && $(PY) -m pytest -m "not slow" --durations=30 $(PYTEST_ARGS); rc=$$?; \
	  $(PY) -m scripts.devcluster down; exit $$rc

soak: setup
	@$(PY) -m scripts.devcluster up || { $(PY) -m scripts.devcluster down; exit 2; }
	@. .devcluster/env.sh && $(PY) -m pytest -m slow $(PYTEST_ARGS); rc=$$?; \
	  $(PY) -m scripts.devcluster down; exit $$rc

clean: cluster-down
	rm -rf .devcluster demo-out
