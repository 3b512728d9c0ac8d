"""A gloo worker: ``python dist_worker.py CASES.pt OUT.pt`` with RANK/WORLD_SIZE/MASTER_* set."""

import os
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import dist_harness  # noqa: E402


def run_one(case: dict, rank: int, world: int, prebuilt=None):
    """A loss case of ``dist_harness``, or a gradient-cache case (``case["harness"] == "gradcache"``)."""
    if case.get("harness") == "gradcache":
        import gradcache_cases

        return gradcache_cases.run(case, case.get("method", "gradcache"), rank, world)
    return dist_harness.run_case(case, rank, world, loss_fn=prebuilt)


def main() -> None:
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cases = torch.load(sys.argv[1], weights_only=False)
    # cases marked "prebuilt" get their loss built now, before the process group exists (as a
    # recipe's loss is built before Composer's trainer creates it); their constructors draw no random numbers
    prebuilt = [dist_harness.make_loss(c) if c.get("prebuilt") else None for c in cases]
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        results = [run_one(case, rank, world, loss) for case, loss in zip(cases, prebuilt)]
        torch.save(results, sys.argv[2])
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
