"""Worker processes end with the prep that started them, however it ends (SIGKILL, out of memory, a crash).

A pool worker blocked on its task queue, or on a result that no one reads, would otherwise wait forever: it
holds both ends of the pool's pipes itself, so it never sees them close. Kept free of heavy imports: a spawned
worker calls :func:`exit_with_parent` from ``data_prep/__init__.py``, before it imports torch or PyAV (seconds on
a busy machine), and again from the pool's initializer.
"""

import ctypes
import os
import signal
import sys
import threading
import time

PARENT_ENV = "ONTHEFLY_PREP_PARENT"  # the prep's pid, set while its pool starts (spawned workers inherit it)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
_watching = False


def exit_with_parent(parent: int) -> None:
    """Make this process exit when ``parent`` (the process that started it) dies. On Linux the kernel sends
    SIGTERM (prctl PR_SET_PDEATHSIG); everywhere a daemon thread polls os.getppid() once a second, which also
    covers a parent that died before this call."""
    global _watching
    if os.getppid() != parent:
        os._exit(1)
    if _watching:
        return
    _watching = True
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def watch_if_spawned() -> None:
    """In a process that a prep spawned (its pid in ``PARENT_ENV`` is this process's parent), start watching."""
    parent = os.environ.get(PARENT_ENV, "")
    if parent.isdigit() and int(parent) == os.getppid():
        exit_with_parent(int(parent))
