# The single entry point for humans and CI.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch 2.14.1 / torchvision 0.29.1 are the releases this platform provides locally; any
# torch >= 2.1 works (setup.py) when you install by hand.
$(STAMP): $(PY) setup.py
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" || $(PY) -m pip install --quiet torch torchvision
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# two pytest-xdist (>= 3.8) workers, whole modules each (module-scoped fixtures run once), slowest modules first
# (tests/conftest.py); every test uses its own tmp_path and free ports.  Serial: $(PY) -m pytest -q
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

demo: $(STAMP)
	$(VENV)/bin/lt demo -o demo-out

bench: $(STAMP)
	$(PY) benchmarks/bench_hessian.py
	$(PY) benchmarks/bench_surface.py
	$(PY) benchmarks/bench_featvar.py
	$(PY) benchmarks/bench_evaluate.py

clean:
	rm -rf $(VENV) build *.egg-info
