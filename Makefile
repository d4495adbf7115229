# The two README commands. Both run scripts/setup.sh first (idempotent; <1 s once installed).
.PHONY: setup demo test benchmark gpu-check gpu-check-cpu clean

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/orchestrator sweep search_spaces/demo.yaml
	.venv/bin/orchestrator report demo

test: setup
	.venv/bin/python -m pytest tests

benchmark: setup
	.venv/bin/python benchmarks/train_two_workers.py

# The GPU path in one prepared run (benchmarks/gpu_check.py): on a GPU machine with python3, torch
# and CUDA (no .venv there; mmseg and mmcv-full come from GPU_WHEELS), and at toy size on CPU.
GPU_WHEELS ?= ../shared/wheels/gpu-py312
GPU_SITE ?= .cache/gpu-site
GPU_CHECK_OUT ?= work_dirs/gpu_check/cuda.json
gpu-check:
	bash scripts/gpu_setup.sh $(GPU_WHEELS) $(GPU_SITE)
	PYTHONPATH=$(abspath $(GPU_SITE)):$(CURDIR) PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --device cuda --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

gpu-check-cpu: setup
	.venv/bin/python benchmarks/gpu_check.py --device cpu

clean:
	rm -rf .venv work_dirs runs data/synthetic_ade data/synthetic_ade_demo
