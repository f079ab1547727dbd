"""What accelerate's notebook_launcher does to the other replicas when one dies (the reason multigpu does not use it).

    python benchmarks/check_notebook_launcher.py        # CPU is enough: the launcher's agent is the same

Replica 1 raises after 1 s; replica 0 would write 10 steps, one every 0.5 s. Prints how many steps replica 0
wrote before the launcher returned: fewer than 10 means a dead replica stops the healthy one too.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time


def work(folder: str) -> None:
    rank = int(os.environ.get("RANK", "-1"))
    if rank == 1:
        time.sleep(1.0)
        raise RuntimeError("replica 1 dies")
    for step in range(10):
        time.sleep(0.5)
        with open(os.path.join(folder, f"rank{rank}.steps"), "a") as f:
            f.write(f"{step}\n")


def main() -> int:
    from accelerate import notebook_launcher

    folder = tempfile.mkdtemp(prefix="nbl-")
    start = time.monotonic()
    error = None
    try:
        notebook_launcher(work, args=(folder,), num_processes=2)
    except Exception as exc:  # the launcher re-raises the replica's failure
        error = type(exc).__name__
    seconds = time.monotonic() - start
    path = os.path.join(folder, "rank0.steps")
    steps = 0
    if os.path.exists(path):
        with open(path) as f:
            steps = len(f.read().split())
    print(json.dumps({"launcher_error": error, "replica0_steps_of_10": steps, "seconds": round(seconds, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
