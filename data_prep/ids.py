"""Clip names of YouTube-based datasets: ``<ytid>_<start>[_<end>]`` with padded or unpadded seconds.

A YouTube id is 11 characters from [A-Za-z0-9_-] (it may itself hold ``_`` or start with ``-``), so a name is
parsed from its first 11 characters rather than by splitting on ``_``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Optional

NAME = re.compile(r"^(?P<yt>[A-Za-z0-9_-]{11})_(?P<start>\d+)(?:_(?P<end>\d+))?$")
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".flv", ".mov")


def parse(name: str) -> Optional[tuple[str, int, Optional[int]]]:
    """(youtube id, start second, end second or None) of a clip name, or None if it is not one."""
    m = NAME.match(name)
    if not m:
        return None
    return m["yt"], int(m["start"]), int(m["end"]) if m["end"] is not None else None


class VideoFiles:
    """Every video file under a folder, found by exact name or by (youtube id, start second)."""

    def __init__(self, roots: Iterable[Path]):
        self.by_stem: dict[str, Path] = {}
        self.by_key: dict[tuple[str, int], Path] = {}
        for root in roots:
            for dirpath, _, files in os.walk(root):
                for f in sorted(files):
                    stem, ext = os.path.splitext(f)
                    if ext.lower() not in VIDEO_EXTENSIONS:
                        continue
                    path = Path(dirpath) / f
                    self.by_stem.setdefault(stem, path)
                    parsed = parse(stem)
                    if parsed:
                        self.by_key.setdefault((parsed[0], parsed[1]), path)

    def __len__(self) -> int:
        return len(self.by_stem)

    def find(self, name: str) -> Optional[Path]:
        """A file for ``name`` in any of its forms: exact, padded or unpadded start, with or without the end."""
        if name in self.by_stem:
            return self.by_stem[name]
        parsed = parse(name)
        return self.by_key.get((parsed[0], parsed[1])) if parsed else None
