"""Ending a distributed run cleanly: its process groups are destroyed while the interpreter is still whole.

Why (measured with torch 2.13, Python 3.11, the gloo backend): a gloo process group runs every collective on worker
threads of its own, and the worker that ran a collective also drops the collective's references to its tensors. When
Python has already let go of such a tensor, that last release takes the GIL. If the interpreter has started to
finalize by then, CPython ends the worker with ``pthread_exit``; the unwinding crosses the ``noexcept`` destructor of
gloo's work object and the C++ runtime calls ``std::terminate``: "terminate called without an active exception",
SIGABRT, exit -6 - after a fit that finished. The window is the moment after the last collective, so it opens when
that collective (an end-of-fit gather, say) comes just before the program ends, on a loaded machine.

Destroying a group whose last reference then goes frees its backend, and the backend joins its worker threads first,
each one done with its tensors. Lightning destroys the default group at exit only for NCCL, and DeepSpeed's
``init_distributed`` (how Lightning's DeepSpeed strategy starts) never does, so under gloo those threads otherwise
live until the process dies.
"""

from __future__ import annotations

import atexit
import sys

import torch.distributed as dist


def destroy_process_groups() -> bool:
    """Destroy every process group of this process; ``False`` when there was none.

    Goes through DeepSpeed when DeepSpeed set the groups up (``deepspeed.comm.destroy_process_group`` also drops
    DeepSpeed's own references to them), else through torch. Call it on every rank once a finished run needs no more
    collectives. For gloo it is local (no collective). A group still referenced elsewhere (a DeepSpeed engine, ZeRO-3
    parameters' ``ds_process_group``) keeps its backend and threads until those references go too.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        deepspeed_comm.destroy_process_group()
    else:
        dist.destroy_process_group()
    return True


def destroy_process_groups_at_exit() -> None:
    """Have :func:`destroy_process_groups` run at interpreter exit, before finalization (an ``atexit`` hook; calling
    this again keeps one hook). A no-op at exit when the program destroyed its groups itself.

    It runs when the program ends on an uncaught exception too, or a failed run could abort the same way and end on
    SIGABRT (and a core dump) instead of its own exit status. It waits no longer than exiting without it: a
    collective still in flight - one a failed peer never joins - holds up the group's destruction until it ends or
    the peer's process goes, and the interpreter's own teardown of the group waits for it just the same.
    """
    atexit.unregister(_destroy_at_exit)
    atexit.register(_destroy_at_exit)


def _destroy_at_exit() -> None:
    destroy_process_groups()
