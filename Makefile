# The two README commands. Both run scripts/setup.sh first (idempotent; <1 s once installed).
.PHONY: setup demo test benchmark clean

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/orchestrator sweep search_spaces/demo.yaml
	.venv/bin/orchestrator report demo

test: setup
	.venv/bin/python -m pytest tests

benchmark: setup
	.venv/bin/python benchmarks/train_two_workers.py

clean:
	rm -rf .venv work_dirs runs data/synthetic_ade data/synthetic_ade_demo
