"""`python -m orchestrator ...`: the command line where the console script is not installed (the
GPU machine's bundle, benchmarks/gpu_sweep.py)."""
import sys

from orchestrator.cli import main

if __name__ == '__main__':
    sys.exit(main())
