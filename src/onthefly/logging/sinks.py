"""RunLogger: W&B (offline by default) + metrics.csv, steps.csv and results.json in the run directory.

The local files are the record of a run; W&B is a copy for dashboards. So W&B trouble never stops training: a
W&B call that fails (its helper process died, the disk under its folder filled up, ...) is reported once, the W&B
run is given up, and the CSV/JSON files go on. What each logged key means is in :mod:`onthefly.logging.names`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import pandas as pd

from onthefly.logging import names

log = logging.getLogger("onthefly")

INIT_TIMEOUT_S = 30.0  # wandb.init's wait for the server (W&B's own default is 90 s); WANDB_INIT_TIMEOUT overrides
STEPS_FLUSH_ROWS = 50  # steps.csv is appended to at least every this many logged steps ...
STEPS_FLUSH_S = 30.0  # ... or this many seconds, at every epoch end and checkpoint, and on any exit


def wandb_logged_in() -> bool:
    """True when wandb itself finds an API key for its configured server: WANDB_API_KEY (or an identity token
    file), its settings files, or the netrc entry `wandb login` wrote for that server's host.

    Asks wandb's own credential lookup (no netrc parsing here, so a server whose host is not api.wandb.ai is
    found too); it neither prompts nor touches the network, and it leaves wandb's session as it was."""
    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth
    except ImportError:  # another wandb layout: its public login check, without prompt or verification
        import wandb

        try:
            return bool(wandb.login(prompt=False, verify=False))
        except Exception:  # noqa: BLE001  (a malformed key is no key)
            return False
    settings = wandb_setup.singleton().settings
    try:
        host = wbauth.HostUrl(settings.base_url, app_url=settings.app_url)
        auth = wbauth.authenticate_session(host=host, source="onthefly", prompt=False, update_session=False)
    except Exception:  # noqa: BLE001  (an invalid key or token file: W&B could not log in with it either)
        return False
    return auth is not None


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def open_wandb_run(folder: Path, config: dict, options: dict) -> tuple[Any, str]:
    """Start a W&B run under ``folder``/wandb; returns (run or None, the mode it got).

    ``options``: mode (offline | online | disabled) and any other ``wandb.init`` argument. online without a
    login, or with a server that does not answer within the init timeout (30 s; WANDB_INIT_TIMEOUT), becomes
    offline with one warning that says how to upload the run later; a W&B that cannot start at all gives
    (None, "disabled") with a warning. Never raises."""
    opts = dict(options)
    mode = opts.pop("mode", "offline")
    if mode == "disabled":
        return None, "disabled"
    if mode == "online" and not wandb_logged_in():
        warnings.warn(
            "logger.mode=online but W&B has no login: logging offline instead (nothing is lost; run "
            "`wandb login`, then `wandb sync` the run's wandb/ folder to upload it).",
            stacklevel=3,
        )
        mode = "offline"
    import wandb

    kwargs = {k: v for k, v in opts.items() if v not in (None, [], "")}
    settings = None if os.environ.get("WANDB_INIT_TIMEOUT") else wandb.Settings(init_timeout=INIT_TIMEOUT_S)
    try:
        run = wandb.init(
            config=config, dir=str(folder), mode=mode, reinit="finish_previous", settings=settings, **kwargs
        )
    except Exception as err:  # noqa: BLE001  (W&B trouble must not cost the run)
        if mode != "online":
            warnings.warn(
                f"W&B could not start ({_first_line(err)}); continuing with the local CSV/JSON files in {folder} only.",
                stacklevel=3,
            )
            return None, "disabled"
        try:
            run = wandb.init(config=config, dir=str(folder), mode="offline", reinit="finish_previous", **kwargs)
        except Exception as again:  # noqa: BLE001
            warnings.warn(
                f"W&B could not start online ({_first_line(err)}) nor offline ({_first_line(again)}); "
                f"continuing with the local CSV/JSON files in {folder} only.",
                stacklevel=3,
            )
            return None, "disabled"
        where = Path(run.dir).parent
        warnings.warn(
            f"W&B server not reached ({_first_line(err)}); this run logs OFFLINE to {where}: upload it "
            f"later with `wandb sync {where}` (WANDB_MODE=offline skips the wait when there is no network).",
            stacklevel=3,
        )
        return run, "offline"
    if mode == "offline":
        log.info(
            "W&B run %s logs offline to %s (upload it with: wandb sync %s)",
            run.id,
            Path(run.dir).parent,
            Path(run.dir).parent,
        )
    return run, mode


class RunLogger:
    """One run's sinks. ``wandb_options``: mode (offline | online | disabled), project, entity, group, job_type,
    name, tags. Online without a login, or without a server that answers within the init timeout, logs offline
    instead, with one warning that says how to upload the run later."""

    def __init__(
        self,
        out_dir: Path,
        config: dict,
        wandb_options: dict,
        log_steps: bool = True,
        enabled: bool = True,
        resume: Optional[dict] = None,
        resume_from: Optional[Path] = None,
    ):
        """``enabled=False`` (ranks other than 0 of a data-parallel run) writes nothing and starts no W&B run.
        ``resume``: a checkpoint's :meth:`state_dict`, to go on with its rows, steps.csv and W&B run id;
        ``resume_from``: the run folder that checkpoint was written in, when it is not ``out_dir``."""
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.log_steps = log_steps
        self.epoch_rows: list[dict] = []
        self._steps_header: Optional[list[str]] = None
        self._steps_pending: list[dict] = []
        self._steps_flushed_at = time.monotonic()
        self.steps_flushed = 0  # the last step written to steps.csv
        self.run = None
        self.mode = "disabled"  # the W&B mode the run actually got
        self.wandb_info: Optional[dict] = None  # results.json's "wandb": the run's id, project, group, ...
        self._wandb_failed = False
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        opts = dict(wandb_options)
        if resume is not None:
            other = resume_from is not None and Path(resume_from).resolve() != self.out_dir.resolve()
            self._restore(resume, Path(resume_from) if other else None)
            if resume.get("wandb_id") and not other:  # a checkpoint of another folder starts a new W&B run
                opts.update(id=resume["wandb_id"], resume="allow")
        self.run = self._start_wandb(config, opts)
        if self.run is not None:
            run = self.run
            self.wandb_info = {
                "id": run.id,
                "project": run.project,
                "entity": run.entity or None,
                "group": run.group or None,
                "job_type": run.job_type or None,
                "name": run.name,
                "mode": self.mode,
                "dir": str(Path(run.dir).parent),
            }

    # --- resume ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a checkpoint keeps of the logger. Pending step rows are written first, so that steps.csv holds
        exactly the steps up to ``steps_flushed`` when the checkpoint is taken."""
        self.flush_steps()
        return {
            "epoch_rows": [dict(r) for r in self.epoch_rows],
            "steps_flushed": self.steps_flushed,
            "wandb_id": self.wandb_info["id"] if self.wandb_info else None,
        }

    def _restore(self, state: dict, source: Optional[Path] = None) -> None:
        """Take back a checkpoint's rows: metrics.csv rewritten from them, steps.csv cut back to the steps the
        checkpoint had written (later rows are computed again, identically). ``source``: the run folder the
        checkpoint belongs to, when it is another one (a run resumed into a new folder): its steps.csv is copied."""
        self.epoch_rows = [dict(r) for r in state.get("epoch_rows", [])]
        flushed = int(state.get("steps_flushed", 0))
        if self.epoch_rows:
            pd.DataFrame(self.epoch_rows).to_csv(self.out_dir / "metrics.csv", index=False)
        else:
            (self.out_dir / "metrics.csv").unlink(missing_ok=True)
        path = self.out_dir / "steps.csv"
        found = source / "steps.csv" if source is not None and (source / "steps.csv").is_file() else path
        self.steps_flushed = 0
        if found.is_file():
            steps = pd.read_csv(found)
            steps = steps[steps[names.STEP] <= flushed]
            if len(steps):
                steps.to_csv(path, index=False)
                self._steps_header = list(steps.columns)
                self.steps_flushed = int(steps[names.STEP].iloc[-1])
            else:
                path.unlink(missing_ok=True)

    # --- W&B ----------------------------------------------------------------------------------------------
    def _start_wandb(self, config: dict, opts: dict):
        run, self.mode = open_wandb_run(self.out_dir, config, opts)
        if run is None:
            return None
        try:
            run.define_metric(names.EPOCH)
            for pattern, axis in names.WANDB_AXES.items():
                run.define_metric(pattern, step_metric=axis)
        except Exception as err:  # noqa: BLE001
            self.run = run
            self._give_up_wandb("define_metric", err)
            return None
        return run

    def _wandb(self, what: str, call: Callable[[Any], Any]) -> None:
        """Run ``call(run)`` on the W&B run, if there still is one; a failure gives W&B up for this run."""
        if self.run is None:
            return
        try:
            call(self.run)
        except Exception as err:  # noqa: BLE001  (a logging failure must never stop training)
            self._give_up_wandb(what, err)

    def _give_up_wandb(self, what: str, err: BaseException) -> None:
        run, self.run = self.run, None
        if self.wandb_info is not None:
            self.wandb_info["error"] = f"{what}: {_first_line(err)}"
        if not self._wandb_failed:
            self._wandb_failed = True
            warnings.warn(
                f"W&B stopped working ({what}: {_first_line(err)}); training goes on without it. metrics.csv, "
                f"steps.csv and results.json in {self.out_dir} hold every number; the W&B run "
                f"{getattr(run, 'id', '?')} ends here.",
                stacklevel=4,
            )
        try:  # end the broken run and drop wandb's connection, so a later run in this process starts afresh
            run.finish(exit_code=1)
        except Exception:  # noqa: BLE001
            try:
                import wandb

                wandb.teardown()
            except Exception:  # noqa: BLE001
                pass

    # --- metrics --------------------------------------------------------------------------------------------
    def log_step(self, metrics: dict, step: int, epoch: int) -> None:
        """One step's scalars (``train/*``): to W&B now, to steps.csv within a few steps (see STEPS_FLUSH_*)."""
        if not (self.enabled and self.log_steps):
            return
        self._steps_pending.append({names.STEP: step, names.EPOCH: epoch, **metrics})
        self._wandb("log", lambda run: run.log(metrics, step=step))
        if len(self._steps_pending) >= STEPS_FLUSH_ROWS or time.monotonic() - self._steps_flushed_at >= STEPS_FLUSH_S:
            self.flush_steps()

    def flush_steps(self) -> None:
        """Append the pending step rows to steps.csv (a column that appears late rewrites the file with it)."""
        self._steps_flushed_at = time.monotonic()
        if not (self.enabled and self._steps_pending):
            return
        df = pd.DataFrame(self._steps_pending)
        path = self.out_dir / "steps.csv"
        if self._steps_header is None:
            self._steps_header = list(df.columns)
            df.to_csv(path, index=False)
        elif set(df.columns) <= set(self._steps_header):
            df.reindex(columns=self._steps_header).to_csv(path, mode="a", header=False, index=False)
        else:
            merged = pd.concat([pd.read_csv(path), df], ignore_index=True)
            self._steps_header = list(merged.columns)
            merged.to_csv(path, index=False)
        self.steps_flushed = int(self._steps_pending[-1][names.STEP])
        self._steps_pending = []

    def write_missing_steps(self, rows: list[dict]) -> None:
        """Rows a checkpoint kept itself (checkpoints written before steps.csv was streamed) that steps.csv lacks."""
        if self.enabled and self.log_steps:
            self._steps_pending.extend(r for r in rows if int(r[names.STEP]) > self.steps_flushed)
            self.flush_steps()

    def log_epoch(self, metrics: dict, step: int) -> None:
        """One epoch's row (names.py: ``epoch``, ``lr``, ``train/*`` means, ``val/*``, ``time/*``): metrics.csv as
        it is, W&B under its epoch names at history step ``step`` (the global step)."""
        self.flush_steps()
        self.epoch_rows.append(dict(metrics))
        if not self.enabled:
            return
        pd.DataFrame(self.epoch_rows).to_csv(self.out_dir / "metrics.csv", index=False)
        row = names.epoch_row_for_wandb(metrics)
        self._wandb("log", lambda run: run.log(row, step=step))

    def log_test(self, metrics: dict, epochs: int) -> None:
        """The selected checkpoint's ``test/*``: metrics.csv's last row (epoch = ``epochs``). W&B gets them in
        the summary (:meth:`finish`), not as a history point."""
        self.epoch_rows.append({names.EPOCH: epochs, **metrics})
        if self.enabled:
            pd.DataFrame(self.epoch_rows).to_csv(self.out_dir / "metrics.csv", index=False)

    def log_images(self, images: dict[str, Path]) -> None:
        """Figures, all in one W&B history row."""
        if self.run is None or not images:
            return
        import wandb

        self._wandb("log images", lambda run: run.log({k: wandb.Image(str(p)) for k, p in images.items()}))

    def log_model(self, path: Path, metadata: dict) -> None:
        """``path`` (best.pt) as the run's model artifact ``model-<run id>`` (aliases best, epoch-<n>); offline it
        is kept in the offline run and uploaded by `wandb sync`."""
        if self.run is None:
            return
        import wandb

        def log_artifact(run):
            artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata=_clean(metadata))
            artifact.add_file(str(path), name=Path(path).name)
            aliases = ["best"] + ([f"epoch-{metadata['epoch']}"] if metadata.get("epoch") is not None else [])
            run.log_artifact(artifact, aliases=aliases)

        self._wandb("log_artifact", log_artifact)

    def finish(self, results: dict) -> None:
        """Write results.json (strict JSON: NaN/Inf as null) and, for a finished run, W&B's summary."""
        if not self.enabled:
            return
        self.flush_steps()
        results = _clean(results)
        if self.wandb_info is not None:
            results.setdefault("wandb", dict(self.wandb_info))
        (self.out_dir / "results.json").write_text(json.dumps(results, indent=2))
        if results.get("status") == "ok":
            summary = names.summary_for_wandb(results, self.epoch_rows)

            def set_summary(run):
                run.log({}, commit=True)  # the last history row first: committing it sets W&B's "last value" summary
                run.summary.update(summary)

            self._wandb("summary", set_summary)

    def close(self, failed: bool = False) -> None:
        self.flush_steps()
        self._wandb("finish", lambda run: run.finish(exit_code=1 if failed else 0))
        self.run = None
