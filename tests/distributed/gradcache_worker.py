"""A gloo worker for the gradient-cache tests: ``python gradcache_worker.py CASES.pt OUT.pt`` (RANK, WORLD_SIZE, MASTER_* set)."""

import os
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import gradcache_cases  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        cases = torch.load(sys.argv[1], weights_only=False)
        results = [gradcache_cases.run(case, case.get("method", "gradcache"), rank, world) for case in cases]
        torch.save(results, sys.argv[2])
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
