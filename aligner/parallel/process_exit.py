"""How a process that ran torch.distributed ends: :func:`end_process`, and :func:`exit_after` for entry points.

Why not simply return from ``main``: a gloo process that returns can abort after its work is done and its
files are written ("terminate called without an active exception", SIGABRT, exit status 134), now and then
on a loaded machine, on one process as well as on several. Gloo runs every collective on its own C++
threads, and such a thread drops its last reference to a finished collective, with its tensors, only after
the Python caller has moved on. A tensor that had a Python object frees it under the GIL. Once the
interpreter is shutting down, CPython 3.11 ends any thread that asks for the GIL with ``pthread_exit``, and
unwinding through the C++ frames calls ``std::terminate``. ``destroy_process_group`` does not stop these
threads: the device meshes, and the sharding caches DTensor keeps at module level, hold the groups (and so
the threads) until interpreter shutdown. So the process skips interpreter shutdown: after a barrier (no rank
leaves while a peer still exchanges data with it), ``destroy_process_group`` and a flush of every stream,
``os._exit`` ends all threads at once.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable, NoReturn


def exit_code(code: object) -> int:
    """The status ``sys.exit(code)`` would give: None is 0, an int itself, anything else 1 (printed to stderr)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def end_process(code: object = 0) -> NoReturn:
    """End this process with ``code`` (as ``sys.exit`` reads it) without interpreter shutdown; see the module doc.

    Call it last, once everything is written: nothing after it runs (no ``atexit`` handlers, no ``finally``
    blocks), so the metrics logger, TensorBoard and wandb must already be closed. A failing rank (non-zero
    ``code``) skips the barrier: its peers may never reach one. Without torch.distributed it is ``sys.exit``.
    """
    status = exit_code(code)
    dist = sys.modules.get("torch.distributed")  # not imported: no process group, no gloo threads
    if dist is None or not dist.is_available() or not dist.is_initialized():
        sys.exit(status)
    if status == 0 and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def exit_after(main: Callable[..., object], *args: object) -> NoReturn:
    """Run an entry point's ``main(*args)`` and end the process with its status through :func:`end_process`.

    A ``SystemExit`` from inside (argparse's ``--help``, the exit after a preemption save) ends the same way.
    Any other exception propagates with its traceback, as from a plain script.
    """
    try:
        code = main(*args)
    except SystemExit as e:
        code = e.code
    end_process(code)
