# The two README commands. Both run scripts/setup.sh first (idempotent; <1 s once installed).
.PHONY: setup demo test benchmark gpu-bundle gpu-sweep gpu-check gpu-sweep-cpu gpu-check-cpu clean

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/orchestrator sweep search_spaces/demo.yaml
	.venv/bin/orchestrator report demo

test: setup
	.venv/bin/python -m pytest tests

benchmark: setup
	.venv/bin/python benchmarks/train_two_workers.py

# The product on a GPU machine (Python 3.12, torch + CUDA, no network): `make gpu-bundle` here
# builds GPU_BUNDLE (Ray, MLflow, optuna, pydantic, mmseg, mmcv; ~48 MB), which
# travels with the checkout; there, `make gpu-sweep` sets up from it (scripts/gpu_setup.sh), runs
# a sweep through `orchestrator sweep` and its report (benchmarks/gpu_sweep.py), then the GPU
# check (benchmarks/gpu_check.py). Both at toy size on CPU: gpu-sweep-cpu, gpu-check-cpu.
GPU_BUNDLE ?= .gpu-bundle
GPU_SITE ?= .cache/gpu-site
GPU_OUT ?= work_dirs/gpu_sweep/$(GPU_DEVICE)
GPU_ENV = PYTHONPATH=$(abspath $(GPU_SITE)):$(CURDIR) PYTHONUNBUFFERED=1
# Within the lent machine's 10-minute command (GPU_SECONDS from the recipe's start): set-up
# (seconds to unpack; 132 s more where the bundled mmcv-full does not import and is built), the
# sweep until 210 s before the end (then SIGTERM: it stops resumably and reports what finished),
# then the checks that the sweep does not already show (b, c, e) until the end
GPU_SECONDS ?= 560
# GPU_DEVICE=cpu: the same recipe at toy size on CPU (a rehearsal of the GPU machine's run)
GPU_DEVICE ?= cuda
GPU_SWEEP_CHECK_ARGS ?= --only b c e
gpu-bundle: setup
	bash scripts/gpu_bundle.sh $(GPU_BUNDLE)

gpu-sweep:  # the check runs also when the sweep failed; the exit is non-zero if either did
	@start=$$(date +%s); \
	bash scripts/gpu_setup.sh $(GPU_BUNDLE) $(GPU_SITE) || exit $$?; \
	$(GPU_ENV) python3 benchmarks/gpu_sweep.py --device $(GPU_DEVICE) --out $(GPU_OUT) \
	  --work work_dirs/gpu_sweep/$(GPU_DEVICE)-work --until $$((start + $(GPU_SECONDS) - 150)) \
	  $(GPU_SWEEP_ARGS); s=$$?; \
	$(GPU_ENV) python3 benchmarks/gpu_check.py --device $(GPU_DEVICE) --out $(GPU_OUT)/gpu_check.json \
	  --until $$((start + $(GPU_SECONDS))) $(GPU_SWEEP_CHECK_ARGS); c=$$?; exit $$((s || c))

gpu-check:
	bash scripts/gpu_setup.sh $(GPU_BUNDLE) $(GPU_SITE)
	$(GPU_ENV) python3 benchmarks/gpu_check.py --device $(GPU_DEVICE) --out $(GPU_OUT)/gpu_check.json $(GPU_CHECK_ARGS)

gpu-sweep-cpu: setup
	.venv/bin/python benchmarks/gpu_sweep.py --device cpu

gpu-check-cpu: setup
	.venv/bin/python benchmarks/gpu_check.py --device cpu

clean:
	rm -rf .venv work_dirs runs data/synthetic_ade data/synthetic_ade_demo
