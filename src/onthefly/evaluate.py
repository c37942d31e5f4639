"""Deprecated name of `python -m onthefly.analyse` (kept for one release): same commands, same arguments."""

from __future__ import annotations

import sys
import warnings

from onthefly.analyse import analyse, main  # noqa: F401  (the old import path keeps working)

DEPRECATION = "`python -m onthefly.evaluate` is deprecated and will be removed: use `python -m onthefly.analyse`."

if __name__ == "__main__":
    warnings.warn(DEPRECATION, FutureWarning, stacklevel=1)
    print(f"note: {DEPRECATION}", file=sys.stderr)
    sys.exit(main())
