"""Progress bars: the one place that decides whether one is drawn.

A bar is drawn when the caller wants one (``enabled``: ``trainer.progress``, a prep's ``progress=``) and stderr
is a terminal. Anywhere else (a Slurm log, a joblib or submitit worker, a pipe, CI) it stays silent: a redrawn
line per update would fill the log with carriage returns. ``ONTHEFLY_PROGRESS=1`` forces bars on (a terminal
that does not say it is one), ``ONTHEFLY_PROGRESS=0`` turns them off everywhere.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Optional

from tqdm.auto import tqdm

ENV = "ONTHEFLY_PROGRESS"


def shown(enabled: bool = True) -> bool:
    """Whether a bar the caller ``enabled`` is drawn (see the module docstring)."""
    if not enabled:
        return False
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return False
    if forced in ("1", "true", "yes", "on"):
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stderr
        return False


def bar(iterable: Optional[Iterable] = None, *, enabled: bool = True, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, silent unless :func:`shown` (a disabled tqdm still iterates, at no cost)."""
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=not shown(enabled), **kwargs)
