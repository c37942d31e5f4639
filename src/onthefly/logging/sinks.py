"""RunLogger: W&B (offline by default) + metrics.csv, steps.csv and results.json in the run directory."""
from __future__ import annotations

import json
import math
import netrc
import os
import warnings
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import pandas as pd


def wandb_logged_in() -> bool:
    """True when W&B has an API key: WANDB_API_KEY, or a ~/.netrc entry for its host (what `wandb login` writes).

    Reads no W&B API and never prompts."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class RunLogger:
    """One run's sinks. ``wandb`` options: mode (offline | online | disabled), project, entity, group,
    job_type, name, tags. Online without a login falls back to offline with a warning."""

    def __init__(self, out_dir: Path, config: dict, wandb_options: dict, log_steps: bool = True,
                 enabled: bool = True, resume: Optional[dict] = None):
        """``enabled=False`` (ranks other than 0 of a data-parallel run) writes nothing and starts no W&B run.
        ``resume``: a checkpoint's :meth:`state_dict`, to go on with its rows, steps.csv and W&B run id."""
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.log_steps = log_steps
        self.epoch_rows: list[dict] = []
        self._steps_header: Optional[list[str]] = None
        self.steps_flushed = 0  # the last step written to steps.csv
        self.run = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        opts = dict(wandb_options)
        if resume is not None:
            self._restore(resume)
            if resume.get("wandb_id"):
                opts.update(id=resume["wandb_id"], resume="allow")
        self.run = self._start_wandb(config, opts)

    # --- resume ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch_rows": [dict(r) for r in self.epoch_rows], "steps_flushed": self.steps_flushed,
                "wandb_id": self.run.id if self.run is not None else None}

    def _restore(self, state: dict) -> None:
        """Take back a checkpoint's rows: metrics.csv rewritten from them, steps.csv cut back to the steps the
        checkpoint had written (later rows are computed again, identically)."""
        self.epoch_rows = [dict(r) for r in state.get("epoch_rows", [])]
        self.steps_flushed = int(state.get("steps_flushed", 0))
        if self.epoch_rows:
            pd.DataFrame(self.epoch_rows).to_csv(self.out_dir / "metrics.csv", index=False)
        else:
            (self.out_dir / "metrics.csv").unlink(missing_ok=True)
        path = self.out_dir / "steps.csv"
        if path.is_file():
            steps = pd.read_csv(path)
            steps = steps[steps["step"] <= self.steps_flushed]
            if len(steps):
                steps.to_csv(path, index=False)
                self._steps_header = list(steps.columns)
            else:
                path.unlink()

    # --- W&B ----------------------------------------------------------------------------------------------
    def _start_wandb(self, config: dict, opts: dict):
        mode = opts.pop("mode", "offline")
        if mode == "disabled":
            return None
        if mode == "online" and not wandb_logged_in():
            warnings.warn(
                "logger.mode=online but W&B has no login: logging offline instead (nothing is lost; run "
                "`wandb login`, then `wandb sync` the run's wandb/ folder to upload it).",
                stacklevel=2,
            )
            mode = "offline"
        import wandb

        kwargs = {k: v for k, v in opts.items() if v not in (None, [], "")}
        try:
            run = wandb.init(config=config, dir=str(self.out_dir), mode=mode, reinit="finish_previous", **kwargs)
        except Exception as err:  # noqa: BLE001  (W&B trouble must not cost the run)
            if mode != "online":
                warnings.warn(f"W&B could not start ({err}); continuing with the local CSV/JSON logs only.", stacklevel=2)
                return None
            warnings.warn(f"W&B online start failed ({err}); logging offline instead.", stacklevel=2)
            run = wandb.init(config=config, dir=str(self.out_dir), mode="offline", reinit="finish_previous", **kwargs)
        run.define_metric("epoch")
        for prefix in ("val", "test", "epoch"):
            run.define_metric(f"{prefix}/*", step_metric="epoch")
        return run

    # --- metrics --------------------------------------------------------------------------------------------
    def log_step(self, metrics: dict, step: int) -> None:
        """Per-step scalars: to W&B now; to steps.csv when the epoch's rows are flushed."""
        if self.run is not None and self.log_steps:
            self.run.log(metrics, step=step)

    def write_steps(self, rows: list[dict]) -> None:
        if not (self.enabled and self.log_steps and rows):
            return
        df = pd.DataFrame(rows)
        path = self.out_dir / "steps.csv"
        if self._steps_header is None:
            self._steps_header = list(df.columns)
            df.to_csv(path, index=False)
        else:
            df.reindex(columns=self._steps_header).to_csv(path, mode="a", header=False, index=False)
        self.steps_flushed = int(rows[-1]["step"])

    def log_epoch(self, metrics: dict, step: int) -> None:
        self.epoch_rows.append(dict(metrics))
        if not self.enabled:
            return
        pd.DataFrame(self.epoch_rows).to_csv(self.out_dir / "metrics.csv", index=False)
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_image(self, key: str, path: Path) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))})

    def finish(self, results: dict) -> None:
        if not self.enabled:
            return
        results = _clean(results)
        if self.run is not None:
            results.setdefault("wandb", {"id": self.run.id, "project": self.run.project, "dir": str(self.run.dir)})
        (self.out_dir / "results.json").write_text(json.dumps(results, indent=2))
        if self.run is not None:
            flat = pd.json_normalize({k: v for k, v in results.items() if k in ("test", "best", "val")}, sep="/")
            for k, v in flat.iloc[0].items():
                self.run.summary[k] = v

    def close(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None
