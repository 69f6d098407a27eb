# One-command entry points. Everything runs inside .venv, created by `make install`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is installed first and pinned: on this CPU machine pip takes the CPU build from
# local disk in seconds; an unpinned torch would pull a multi-GB CUDA build. On a GPU
# machine the same pin takes PyPI's CUDA build. Override with `make install TORCH=...`.
TORCH  ?= torch==2.13.0

.PHONY: install test demo bench bench-smoke clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

test: install
	$(PY) -m pytest -q

clean:
	rm -rf runs data bench/out
