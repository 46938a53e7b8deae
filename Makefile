# Two commands do everything on a fresh machine (Python 3.11, no accelerator needed):
#   make demo   set up .venv and run the main job: train configs/tiny.py on the built-in synthetic
#               shapes (CPU, 10-24 min), evaluate it on held-out images (eval.py, the paper's
#               single-point protocol), write overlay PNGs
#   make test   set up .venv and run the whole test suite
# .venv gets the exact versions CI tests (constraints.txt); `make test-latest` installs the newest
# versions pyproject.toml's ranges allow into .venv-latest and runs the fast tests there.
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
LATEST_VENV ?= .venv-latest
PY := $(VENV)/bin/python
OUT ?= out
PYTEST_ARGS ?=

# Quick tests of the code's use of jax / flax / optax / orbax / TFDS / Grain (no PyTorch): ~3 min.
FAST_TESTS ?= tests/test_modeling.py tests/test_attention_paths.py tests/test_optimizer.py \
	tests/test_training_losses.py \
	tests/test_prompt_rounds.py tests/test_sharding.py tests/test_data_pipeline.py \
	tests/test_compile_only.py
FAST_SELECT ?= not compiled and not fsdp and not microbatches_give

.PHONY: setup demo test test-latest bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]" -c $(CONSTRAINTS)
	touch $@

# The demo runs on the CPU. .venv holds libtpu (for the compile-only tests), whose TPU probe prints
# errors on a machine without a TPU: name the platform unless the caller did (JAX_PLATFORMS=...).
demo: export JAX_PLATFORMS ?= cpu
demo: setup
	$(PY) train.py --config=configs/tiny.py --workdir=$(OUT)/tiny
	$(PY) eval.py --config=configs/eval/synthetic.py --config.checkpoint=$(OUT)/tiny --workdir=$(OUT)/eval
	$(PY) -m sam_jax.demo --checkpoint $(OUT)/tiny --out $(OUT)/demo

# Two pytest-xdist workers, a test file each at a time (module fixtures run once): the suite is
# mostly single-threaded XLA compiles, which a second worker overlaps (TEST_WORKERS=0: serial).
# Files go out in collection order, the longest first (tests/conftest.py).
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 \
		--nbmake tests notebooks \
		$(PYTEST_ARGS)

# A fresh venv each time, no constraints: a release inside the ranges that breaks us fails here.
test-latest:
	rm -rf $(LATEST_VENV)
	python3 -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q -e ".[test-core]"
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable > $(LATEST_VENV)/versions.txt
	diff $(CONSTRAINTS) $(LATEST_VENV)/versions.txt | grep '^>' || true  # what differs from CI's
	$(LATEST_VENV)/bin/python -m pytest -q --durations=5 $(FAST_TESTS) -k "$(FAST_SELECT)"

bench: setup
	$(PY) bench/encoder_cpu.py

clean:
	rm -rf $(OUT) .pytest_cache $(LATEST_VENV)
