"""Ends through aligner.parallel.process_exit in the way argv[1] names; prints what the test checks.

    python end_process.py plain 5        # no process group: end_process(5) is sys.exit(5), atexit runs
    python end_process.py gloo 3         # a gloo world (of one, or torchrun's): a collective, then end_process(3)
    python end_process.py system_exit    # exit_after(main) where main raises SystemExit("...")
"""
import atexit
import sys

import torch

from aligner.parallel import init_distributed
from aligner.parallel.process_exit import end_process, exit_after


def main() -> None:
    mode, code = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0
    atexit.register(lambda: print("atexit ran", flush=True))
    if mode == "plain":
        print("before end", end="")  # no newline and no flush: end_process must flush it
        end_process(code)
    rank, world = init_distributed("gloo")
    total = torch.tensor([float(rank + 1)])
    torch.distributed.all_reduce(total)
    print(f"rank {rank} of {world}: sum {total.item():g}", end="")
    if mode == "gloo":
        end_process(code)
    exit_after(lambda: sys.exit("the run stopped: bad input"))


if __name__ == "__main__":
    main()
