"""Where the project's own files are: the Hydra configs, the table specs and the published numbers ship inside
the package (``onthefly/conf``, ``onthefly/experiments`` in an installed wheel); in a source checkout they are the
repository's top-level ``conf/`` and ``experiments/`` (the files a user edits), which the wheel is built from."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

PACKAGE = Path(__file__).resolve().parent


def _source_root() -> Optional[Path]:
    root = PACKAGE.parents[1]  # src/onthefly -> the repository
    return root if (root / "pyproject.toml").is_file() and (root / "conf" / "config.yaml").is_file() else None


SOURCE_ROOT = _source_root()  # None: an installed package


def _shipped(name: str) -> Path:
    packaged = PACKAGE / name
    if (packaged / "__init__.py").exists() or not SOURCE_ROOT:
        return packaged
    return SOURCE_ROOT / name


CONF_DIR = _shipped("conf")
EXPERIMENTS_DIR = _shipped("experiments")
PUBLISHED_CSV = EXPERIMENTS_DIR / "published_results.csv"
# table outputs: beside the specs in a checkout; under the working folder for an installed package
RESULTS_DIR = (SOURCE_ROOT / "experiments" / "results") if SOURCE_ROOT else Path("experiments") / "results"
