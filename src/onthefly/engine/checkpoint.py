"""Training checkpoints for preemption-safe resume.

A checkpoint is one ``torch.save`` dict under ``<run>/checkpoints/step-<global step>.pt`` holding everything a
run needs to go on exactly where it stopped: model, optimizer, scheduler, GradScaler, the modulation's state,
the position in the epoch, every rank's RNG states, the best epoch so far and the logger's rows. It is written
to a temporary file and renamed (atomic on POSIX), and read back with ``torch.load(weights_only=True)``, so a
checkpoint can hold tensors and plain Python values only.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from onthefly.config import may_change_on_resume
from onthefly.engine.errors import CheckpointError

FORMAT = "onthefly-checkpoint"
VERSION = 1
SUBDIR = "checkpoints"
_NAME = re.compile(r"^step-(\d+)\.pt$")


# --- RNG states (only tensors and plain values, so weights_only loading accepts them) -------------------------
def rng_state(device: torch.device) -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# --- files ----------------------------------------------------------------------------------------------------
def checkpoint_dir(run_dir: Path | str) -> Path:
    return Path(run_dir) / SUBDIR


def run_dir_of(checkpoint: Path | str) -> Optional[Path]:
    """The run folder a checkpoint file was written in (None for a file outside a ``checkpoints/`` folder)."""
    checkpoint = Path(checkpoint).resolve()
    return checkpoint.parent.parent if checkpoint.parent.name == SUBDIR else None


def path_for(run_dir: Path | str, global_step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step-{global_step:09d}.pt"


def save(state: dict, path: Path) -> Path:
    """Write a training checkpoint atomically (see :func:`write_atomic`)."""
    return write_atomic({"format": FORMAT, "version": VERSION, **state}, path)


def write_atomic(obj: dict, path: Path) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically: a temporary file in the same folder, fsync, then a rename
    over ``path``. If the write fails, ``path`` (and every older file) is left as it was; a full disk raises
    :class:`CheckpointError` saying so, where, and how much the file needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        full = _disk_full(err)
        if full is None:
            raise
        raise CheckpointError(_disk_full_message(path, obj, full)) from err
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def _disk_full(err: BaseException) -> Optional[OSError]:
    """The out-of-space OSError behind ``err``, if any (torch.save reports a failed write of its file object as
    a RuntimeError 'unexpected pos ...' whose context is the OSError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
            return err
        err = err.__cause__ or err.__context__
    return None


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _disk_full_message(path: Path, obj: dict, err: OSError) -> str:
    try:
        free = f"{_size(shutil.disk_usage(path.parent).free)} free"
    except OSError:
        free = "free space unknown"
    older = [p for p in list_checkpoints(path.parent.parent) if p != path] if path.parent.name == SUBDIR else []
    then = (
        f"then add trainer.resume=auto to the same command: the previous checkpoint {older[0]} is intact"
        if older
        else f"then run the command again ({path} was not changed)"
    )
    return (
        f"disk full while writing {path} ({os.strerror(err.errno)}): {path.parent} has {free}, the file needs "
        f"about {_size(_nbytes(obj))}. Free space there (or point the run at a larger disk), {then}."
    )


def load(path: Path | str) -> dict:
    """Read a checkpoint (weights_only); a file that is unreadable or not ours raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (truncated zip, pickle error, foreign objects: all mean "cannot use")
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            "delete it to fall back to an older one, or start over with trainer.resume=never"
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an onthefly training checkpoint (best.pt and other weight files cannot be resumed "
            "from); point trainer.resume at a file under <run>/checkpoints/"
        )
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {state.get('version')}, this code reads {VERSION}")
    return state


def list_checkpoints(run_dir: Path | str) -> list[Path]:
    """Checkpoint files of a run, newest (highest global step) first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def find_resume(run_dir: Path | str, resume: str) -> Optional[tuple[Path, dict]]:
    """The checkpoint to resume from for ``trainer.resume``: never -> None; auto -> the newest one that loads
    (an unreadable newer one is reported and skipped; None when the run has none yet); else the named file."""
    if resume in ("never", "", None):
        return None
    if resume != "auto":
        return Path(resume), load(resume)
    candidates = list_checkpoints(run_dir)
    errors = []
    for path in candidates:
        try:
            return path, load(path)
        except CheckpointError as err:
            errors.append(str(err))
            warnings.warn(f"skipping {err}", stacklevel=2)
    if errors:
        raise CheckpointError("trainer.resume=auto found no usable checkpoint: " + " | ".join(errors))
    return None


def prune(run_dir: Path | str, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for path in list_checkpoints(run_dir)[max(keep, 1) :]:
        path.unlink(missing_ok=True)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """Keys (dotted) whose values differ between a checkpoint's config and this run's, leaving out the settings
    that may differ on resume (how a run runs, not what it computes: their schema fields carry
    ``onthefly.config.MAY_CHANGE_ON_RESUME``)."""
    a, b = _flatten(saved), _flatten(current)
    free = may_change_on_resume(saved, current)
    return [k for k in sorted(set(a) | set(b)) if k not in free and a.get(k, "<unset>") != b.get(k, "<unset>")]
