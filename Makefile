# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: demo demo-full test test-fast venv clean

# `make demo ISA=avx2`: the same flow with oneDNN (PyTorch's and OpenVINO's), ATen and MKL capped to AVX2 + FMA,
# so an AVX-512 machine computes as an AVX2-only one (no AVX-512, no native bf16: amp bf16 falls back to float32).
# The report and benchmarks name the cap. It caps instruction sets, not clocks or caches.
# It writes runs/demo_avx2 (runs/demo_full_avx2), so a capped run never reuses the stages of an uncapped one.
ifeq ($(ISA),avx2)
export ONEDNN_MAX_CPU_ISA := AVX2
export ATEN_CPU_CAPABILITY := avx2
export MKL_ENABLE_INSTRUCTIONS := AVX2
DEMO_NAME = run.name=$(1)_avx2
else ifneq ($(ISA),)
$(error ISA=$(ISA): only ISA=avx2 is known)
endif

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[train,dev]"
	touch $(STAMP)

venv: $(STAMP)

# `make demo ARGS='student.names=[swinunetr_tiny]'`: config overrides passed to distill/run.py (README, "The demo's
# budget and the CPU").
demo: $(STAMP)
	$(PY) distill/run.py --config configs/demo.yaml $(call DEMO_NAME,demo) $(ARGS)

demo-full: $(STAMP)
	$(PY) distill/run.py --config configs/demo_full.yaml $(call DEMO_NAME,demo_full) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q --timeout=900 --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --timeout=600

clean:
	rm -rf $(VENV) runs .pytest_cache
