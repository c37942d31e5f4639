"""Installing like a package: the wheel carries the configs, the table specs and data_prep, and an installed
onthefly trains from any folder (no source checkout on the path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def _source_packages() -> set[str]:
    found = {"onthefly.conf", "onthefly.experiments"}
    for init in (ROOT / "src").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT / "src").parts))
    for init in (ROOT / "data_prep").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    return found


def test_pyproject_lists_every_package_of_the_source_tree():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert listed == _source_packages()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = out.glob("onthefly-*.whl")
    return found


@pytest.mark.slow
def test_the_wheel_carries_configs_specs_and_prep(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "onthefly/conf/config.yaml",
        "onthefly/conf/modulation/ogm_ge.yaml",
        "onthefly/conf/hydra/launcher/slurm.yaml",
        "onthefly/experiments/cvpr-t1.yaml",
        "onthefly/experiments/published_results.csv",
        "data_prep/cremad.py",
        "onthefly/resources.py",
    } <= names
    assert not [n for n in names if "/results/" in n or "__pycache__" in n]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "onthefly-train = onthefly.train:main" in scripts and "onthefly-analyse" in scripts


@pytest.mark.slow
def test_an_installed_package_trains_from_another_folder(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**subprocess_env(), "PYTHONPATH": str(site)}  # ahead of the checkout's editable install
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import onthefly, onthefly.resources as r, json; "
            "print(json.dumps([onthefly.__file__, str(r.CONF_DIR), r.SOURCE_ROOT is None]))",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    where, conf, installed = json.loads(check.stdout)
    assert where.startswith(str(site)) and conf.startswith(str(site)) and installed
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "onthefly.train",
            "debug=fast",
            "trainer.epochs=1",
            "trainer.threads=1",
            "trainer.plots=false",
            "hydra.run.dir=run",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert json.loads((work / "run" / "results.json").read_text())["status"] == "ok"
    listing = subprocess.run(
        [sys.executable, "-m", "onthefly.tables", "list"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert listing.returncode == 0 and "cvpr-t1" in listing.stdout, listing.stderr[-2000:]
    assert not (work / "experiments" / "results").exists() or os.listdir(work / "experiments" / "results") == []
