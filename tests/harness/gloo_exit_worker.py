"""One rank of a plain torch gloo program that never destroys its process group, as a user's script after
``trainer.fit`` does not. Launched by ``tests/test_clean_exit.py``, one process per rank.

It runs one all_reduce of a tensor it then drops (the pattern that leaves gloo's worker the last owner), and exits.
An ``atexit`` hook registered first - so it runs last, just before interpreter finalization - writes
``exit{RANK}.json`` (``launch.exit_record``). ``--at-exit`` calls ``destroy_process_groups_at_exit()``; ``--fail``
raises after the collective instead of returning.

Usage: RANK=r WORLD_SIZE=n MASTER_ADDR=... MASTER_PORT=... python gloo_exit_worker.py OUT_DIR [--at-exit] [--fail]
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from launch import exit_record

from lightning_compress.teardown import destroy_process_groups_at_exit


def write_record(out_dir: Path) -> None:
    (out_dir / f"exit{os.environ['RANK']}.json").write_text(json.dumps(exit_record()))


def main(out_dir: Path, flags: list[str]) -> None:
    atexit.register(write_record, out_dir)
    dist.init_process_group("gloo")
    if "--at-exit" in flags:
        destroy_process_groups_at_exit()
    tensor = torch.ones(1000)
    dist.all_reduce(tensor)
    del tensor
    if "--fail" in flags:
        raise RuntimeError("a failure after the last collective")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
