# Two commands do everything on a fresh machine (Python 3.11, no accelerator needed):
#   make demo   set up .venv and run the main job: train configs/tiny.py on the built-in synthetic
#               shapes (CPU, ~12 min), evaluate it on held-out images (eval.py, the paper's
#               single-point protocol), write overlay PNGs
#   make test   set up .venv and run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(PY) train.py --config=configs/tiny.py --workdir=$(OUT)/tiny
	$(PY) eval.py --config=configs/eval/synthetic.py --config.checkpoint=$(OUT)/tiny --workdir=$(OUT)/eval
	$(PY) -m sam_jax.demo --checkpoint $(OUT)/tiny --out $(OUT)/demo

test: setup
	$(PY) -m pytest -q --durations=15 --nbmake tests notebooks $(PYTEST_ARGS)

bench: setup
	$(PY) bench/encoder_cpu.py

clean:
	rm -rf $(OUT) .pytest_cache
