# `make run`: the main job on the embedded default. `make test`: the test suite.
# Both build .venv on first use, and again when pyproject.toml or constraints.txt changes: torch==2.13.0
# (CPU wheel) first, then the project with its `test` extra (pytest, pytest-xdist, openai), pinned by
# constraints.txt.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.strata-installed
OUT    ?= runs/default

.PHONY: run test install smoke bench clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# `make run` compares how much each strategy forgets, so the gate reports its verdicts (on every
# registry card) instead of holding SeqLoRA's forgetting candidates back; `strata arrive` enforces it.
run: $(STAMP)
	$(VENV)/bin/strata run --strategy seqlora --strategy decoupled --strategy multitask --gate report --out $(OUT) $(ARGS)

# The same job, small (`strata run --smoke-test`: the test backbone, 2 tasks, 60 steps, few rows).
smoke:
	$(MAKE) run ARGS=--smoke-test OUT=runs/smoke

# Two pytest workers (pytest-xdist), one test file each at a time: most of the integration tests'
# time is spent waiting on Ray (process starts, polls), so two share the 2 cores well.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(PY) benchmarks/train_cost.py

clean:
	rm -rf runs .pytest_cache
