# kdlab: `make demo` runs the main job on the offline default, `make test` runs the tests.
# Both create .venv and install what they need the first time.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU/GPU wheels of torch: pinned to releases the package index here serves from its cache.
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.kdlab-installed

.PHONY: install demo test lint bench clean-cache reproduce

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PKGS)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kdlab train

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n auto --dist loadscope --no-loadscope-reorder

# The README's CIFAR-100 table on a GPU machine: teachers, then pairs x methods x seeds
# (resumable: run it again after an interruption), then the table. ARGS=--dry-run shows the
# plan and its GPU hours; ARGS="--pairs resnet32x4-resnet8x4 --seeds 0" etc.
reproduce: $(STAMP)
	$(BIN)/python scripts/reproduce_cifar100.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean-cache:
	rm -rf $${KDLAB_CACHE_DIR:-$$HOME/.cache/kdlab}/teachers $${KDLAB_CACHE_DIR:-$$HOME/.cache/kdlab}/teacher_logits
