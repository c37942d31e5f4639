"""Expand a table spec into training jobs, launch every missing one at once, and run the post-training analyses.

One job per (row, column, seed), written to ``<results>/<table>/runs/<row>__<column>/seed<k>/`` (under a fidelity
other than clean: ``<results>/<table>/<fidelity>/runs/...``, see `spec.py`). A job's state is
read from its folder (:func:`job_state`): done (results.json status ok), failed (status failed: the error is
kept), started (a folder without a result: still running, queued on a cluster, or stopped) or to do.

All the jobs to run go into ONE Hydra multirun, so a Slurm launch is one job array: each job becomes a generated
preset ``<results>/<table>/launch/experiment/table_job/<job>.yaml`` (a ``# @package _global_`` config that
includes the column's experiment preset, selects the cell's group options, its fidelity among them, and its
``table_cell`` option, whose values file ``table_cell/values/<job>.yaml`` holds the cell's values, the seed, the
W&B group / tags / job type; conf/config.yaml applies it after fidelity's options, so a cell's own value wins over
them as on a command line), the folder is added with ``hydra.searchpath``, and the multirun sweeps
``experiment`` over the job names; jobs of different fidelities share one multirun. The launcher is one of the repository's presets
(conf/hydra/launcher/: serial, parallel, local, slurm), and every table job resumes from its own newest checkpoint
(``trainer.resume=auto``), so a preempted, timed-out or interrupted job continues where it stopped.

A failed job is not run again unless asked (``retry_failed``): a job that fails deterministically would fail
again. W&B: group = table name (+ ``-<fidelity>`` beyond clean), tags = [row, column], job_type = row.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from omegaconf import OmegaConf

from onthefly.config import CONF_DIR, validate
from onthefly.resources import RESULTS_DIR
from onthefly.tables.spec import Column, Row, SpecError, TableSpec

LAUNCHER_DIR = CONF_DIR / "hydra" / "launcher"
# --launcher NAME -> hydra/launcher=NAME: the presets in conf/hydra/launcher/ are the one vocabulary
LAUNCHERS = sorted(p.stem for p in LAUNCHER_DIR.glob("*.yaml"))
SUBMITIT = {"local", "slurm"}  # presets over hydra-submitit-launcher (they take a job name)
JOB_GROUP = "table_job"  # generated presets: experiment/<JOB_GROUP>/<job>.yaml under <results>/<table>/launch/
CELL_GROUP = "table_cell"  # and the job's values: table_cell/values/<job>.yaml (conf/config.yaml applies them last)
# errors that mean the job was stopped from outside, not that it failed: it runs again (and resumes)
INTERRUPTED = ("KeyboardInterrupt", "SystemExit")

DONE, FAILED, STARTED, TODO, NO_DATA = "done", "failed", "started", "to do", "no data"


@dataclass
class Job:
    """One (row, column, seed) training run of a table."""

    row: Row
    col: Column
    seed: int
    run_dir: Path
    state: str = TODO
    error: Optional[str] = None  # failed: the error results.json records; no data: why

    @property
    def name(self) -> str:
        return f"{self.row.id}__{self.col.id}__s{self.seed}"

    @property
    def log_path(self) -> Path:
        """The job's own log (Hydra writes ``<job name>.log``, train.log, into the run folder)."""
        return self.run_dir / "train.log"

    def describe(self) -> str:
        return f"{self.row.id} × {self.col.id}, seed {self.seed}"


@dataclass
class CellPlan:
    row: Row
    col: Column
    cell_dir: Path
    jobs: list[Job] = field(default_factory=list)
    no_data: Optional[str] = None  # why the cell cannot run

    def seeds(self, *states: str) -> list[int]:
        return [j.seed for j in self.jobs if j.state in states]

    @property
    def done(self) -> list[int]:
        return self.seeds(DONE)

    @property
    def missing(self) -> list[int]:
        """Seeds without a finished run (failed, started and not started alike)."""
        return [j.seed for j in self.jobs if j.state != DONE]


def cell_dir(results: Path, spec: TableSpec, row: Row, col: Column) -> Path:
    return results / spec.folder / "runs" / f"{row.id}__{col.id}"


def job_state(run_dir: Path) -> tuple[str, Optional[str]]:
    """(state, error) of a job from its folder; see the module docstring."""
    path = Path(run_dir) / "results.json"
    if path.exists():
        try:
            results = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            return STARTED, None  # unreadable: written again when the job runs
        if results.get("status") == "ok":
            return DONE, None
        error = str(results.get("error") or "failed without an error message")
        if error.split(":", 1)[0] in INTERRUPTED:
            return STARTED, None
        return FAILED, error
    return (STARTED if Path(run_dir).is_dir() else TODO), None


def run_ok(run_dir: Path) -> bool:
    return job_state(run_dir)[0] == DONE


def _hydra_compose(overrides: list[str], hydra_config: bool = False):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from onthefly.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra_config)


def _is_hydra(override: str) -> bool:
    return override.lstrip("+~").startswith(("hydra.", "hydra/"))


def data_root(overrides: list[str] = ()) -> Path:
    """``paths.data_root`` as training resolves it (conf/paths/, the environment, any ``paths…`` override)."""
    own = [o for o in overrides if o.lstrip("+~").split("=", 1)[0].split(".")[0] == "paths"]
    return Path(_hydra_compose(own).paths.data_root)


def plan(spec: TableSpec, seeds: list[int], results: Path = RESULTS_DIR, root: Optional[Path] = None) -> list[CellPlan]:
    """Every run-owning cell with its jobs' states, and why a cell cannot run (pending column, missing data)."""
    root = Path(root) if root is not None else data_root()
    out = []
    for row, col in spec.run_cells():
        d = cell_dir(results, spec, row, col)
        no_data = None
        data = spec.data_folder(row, col)
        if col.pending:
            no_data = f"not available yet: {col.pending}"
        elif data and not (root / data).exists():
            prep = col.prep or f"the prep command for {col.data}"
            if data != col.data:  # the official cache: its own folder, prepared with the official options
                prep = f"{prep} FIDELITY={spec.row_fidelity(row)}"
            no_data = f"no data: run {prep} (looked in {root / data})"
        jobs = []
        for s in seeds:
            state, error = job_state(d / f"seed{s}")
            if no_data and state != DONE:
                state, error = NO_DATA, no_data
            jobs.append(Job(row, col, s, d / f"seed{s}", state, error))
        out.append(CellPlan(row, col, d, jobs, no_data))
    return out


def all_jobs(cells: list[CellPlan]) -> list[Job]:
    return [j for c in cells for j in c.jobs]


def to_run(cells: list[CellPlan], retry_failed: bool = False) -> list[Job]:
    wanted = {TODO, STARTED} | ({FAILED} if retry_failed else set())
    return [j for j in all_jobs(cells) if j.state in wanted]


# --- the generated job presets -----------------------------------------------------------------------------
def launch_dir(results: Path, spec: TableSpec) -> Path:
    """The search-path folder of a table's generated job presets."""
    return results / spec.folder / "launch"


def job_option(job: Job) -> str:
    """The job's option of the ``experiment`` group (what the multirun sweeps over)."""
    return f"{JOB_GROUP}/{job.name}"


def job_overrides(spec: TableSpec, job: Job) -> list[str]:
    """The job as command-line overrides (what its preset holds), for dry runs and checks."""
    return [
        *spec.cell_overrides(job.row, job.col),
        f"seed={job.seed}",
        f"logger.name={spec.group}:{job.row.id}:{job.col.id}:s{job.seed}",
        f"logger.group={spec.group}",
        f"logger.tags=[{job.row.id},{job.col.id}]",
        f"logger.job_type={job.row.id}",
    ]


def job_preset(spec: TableSpec, job: Job) -> tuple[str, str]:
    """The job as two generated configs: its ``experiment`` option (includes the column's experiment preset, selects
    the cell's group options, fidelity included, and its ``table_cell`` option; sets the job's output folder) and
    its ``table_cell`` values (applied after fidelity=official's options, so the cell's own values win over them
    as a command line's would; conf/config.yaml)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    from onthefly.tables.spec import _GROUPS

    parser = OverridesParser.create()
    includes, groups, body = [], {}, OmegaConf.create({})
    for text in job_overrides(spec, job):
        override = parser.parse_override(text)
        key = override.key_or_group
        if override.is_sweep_override() or override.type == OverrideType.DEL or override.package:
            raise SpecError(
                f"{spec.path}: cell {job.row.id} × {job.col.id}: override {text!r} cannot go into a job "
                "preset (no sweeps, deletions or packages in a table cell)"
            )
        value = override.value()
        if key == "experiment":
            includes = [f"/experiment/{value}"]
        elif key in _GROUPS:
            groups.pop(key, None)  # the last choice wins, as on a command line
            groups[key] = value
        else:
            OmegaConf.update(body, key, value, merge=True, force_add=True)
    groups[CELL_GROUP] = job.name
    hydra = OmegaConf.create({"hydra": {"sweep": {"subdir": f"{job.run_dir.parent.name}/{job.run_dir.name}"}}})
    defaults = [*includes, *({f"override /{k}": v} for k, v in groups.items()), "_self_"]
    head = (
        f"# @package _global_\n# Generated by `python -m onthefly.tables run {spec.name}` from {spec.path.name}: "
        f"{job.describe()}, fidelity {spec.row_fidelity(job.row)}. Regenerated at every launch; edit the spec, "
        "not this file.\n"
    )
    preset = head + OmegaConf.to_yaml(OmegaConf.create({"defaults": defaults, **OmegaConf.to_container(hydra)}))
    values = f"# {job.describe()}: the cell's own values (see {JOB_GROUP}/{job.name}.yaml)\n" + OmegaConf.to_yaml(body)
    return preset, values


def write_presets(spec: TableSpec, jobs: list[Job], results: Path) -> Path:
    root = launch_dir(results, spec)
    folders = [root / "experiment" / JOB_GROUP, root / CELL_GROUP, root / CELL_GROUP / "values"]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    for job in jobs:
        preset, values = job_preset(spec, job)
        (folders[0] / f"{job.name}.yaml").write_text(preset)
        (folders[1] / f"{job.name}.yaml").write_text(
            f"# @package _global_\n# a generated table job (its values: values/{job.name}.yaml)\n"
        )
        (folders[2] / f"{job.name}.yaml").write_text(values)
    return root


def check_cells(spec: TableSpec, jobs: list[Job], extra: list[str]) -> dict[tuple[str, str], str]:
    """Compose each distinct cell once (with the extra overrides): {(row, col): error} for those that do not,
    so that one broken cell fails alone instead of stopping the whole multirun before it starts."""
    errors, seen = {}, set()
    for job in jobs:
        key = (job.row.id, job.col.id)
        if key in seen:
            continue
        seen.add(key)
        try:
            cfg = _hydra_compose([*job_overrides(spec, job), *[o for o in extra if not _is_hydra(o)]])
            validate(cfg, environment=False)  # values in range (the machine that runs it may differ from this one)
        except Exception as err:  # noqa: BLE001  (reported per cell)
            errors[key] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    return errors


# --- launching ---------------------------------------------------------------------------------------------
def launcher_overrides(launcher: str, spec: TableSpec) -> list[str]:
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; choose from {LAUNCHERS} (conf/hydra/launcher/)")
    out = [f"hydra/launcher={launcher}"]
    if launcher in SUBMITIT:
        if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
            raise ValueError(
                f"launcher {launcher!r} needs hydra-submitit-launcher, an optional dependency: "
                "pip install 'onthefly[cluster]' (or use --launcher serial / parallel)"
            )
        out.append(f"hydra.launcher.name=otf-{spec.group}")  # the job (array) name in squeue
    return out


def launcher_settings(launcher: str, spec: TableSpec, extra: list[str]) -> dict:
    """The launcher's settings as the jobs will get them (preset + overrides), unset ones left out."""
    overrides = [*launcher_overrides(launcher, spec), *[o for o in extra if _is_hydra(o)]]
    cfg = _hydra_compose(overrides, hydra_config=True).hydra.launcher
    settings = {}
    for key in cfg:
        if key in ("_target_", "submitit_folder", "setup"):
            continue
        try:
            value = OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        except Exception:  # noqa: BLE001  (an interpolation only the running sweep can resolve)
            value = OmegaConf.to_container(cfg, resolve=False)[key]
        if value not in (None, {}, []):
            settings[key] = value
    return settings


def sweep_command(spec: TableSpec, jobs: list[Job], launcher: str, extra: list[str], results: Path) -> list[str]:
    """The one multirun that runs ``jobs`` (their presets must be written: :func:`write_presets`)."""
    common = [] if any(o.split("=", 1)[0] == "trainer.resume" for o in extra) else ["trainer.resume=auto"]
    return [
        sys.executable,
        "-m",
        "onthefly.train",
        "-m",
        *launcher_overrides(launcher, spec),
        f"hydra.searchpath=[file://{launch_dir(results, spec).resolve()}]",
        f"hydra.sweep.dir={(results / spec.folder / 'runs').resolve()}",
        *common,
        *extra,
        "experiment=" + ",".join(job_option(j) for j in jobs),
    ]


def _lock(results: Path, spec: TableSpec) -> Path:
    return results / spec.folder / "launch.json"


def running_launch(results: Path, spec: TableSpec) -> Optional[dict]:
    """The record of a launch of this table that is still waiting for its jobs on this machine, if any."""
    path = _lock(results, spec)
    try:
        info = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if info.get("finished") or info.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(info["pid"]), 0)
    except (ProcessLookupError, ValueError, KeyError):
        return None
    except PermissionError:
        pass  # alive, another user's
    return info


def last_launch(results: Path, spec: TableSpec) -> Optional[dict]:
    try:
        return json.loads(_lock(results, spec).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_sweep(
    spec: TableSpec,
    seeds: list[int],
    launcher: str = "serial",
    extra: Optional[list[str]] = None,
    results: Path = RESULTS_DIR,
    dry_run: bool = False,
    retry_failed: bool = False,
    log: Callable[[str], None] = print,
    poll_s: float = 15.0,
) -> list[CellPlan]:
    """Launch every missing job of the table as one multirun (blocking until it ends), then return the new plan.
    Failed jobs are left alone unless ``retry_failed``; cells whose config does not compose are reported as
    failed and left out of the launch."""
    extra = list(extra or [])
    launcher_overrides(launcher, spec)  # refuse an unknown launcher before anything else
    cells = plan(spec, seeds, results, data_root(extra))
    jobs = all_jobs(cells)
    count = {s: sum(j.state == s for j in jobs) for s in (DONE, FAILED, STARTED, TODO, NO_DATA)}
    todo = to_run(cells, retry_failed)
    log(
        f"{spec.name} (fidelity {spec.fidelity_text}): {len(cells)} cells, {len(jobs)} jobs: {count[DONE]} done, "
        f"{count[FAILED]} failed, {count[STARTED]} started, {count[TODO]} not started, {count[NO_DATA]} without data; "
        f"{len(todo)} to run"
    )
    for c in cells:
        if c.no_data:
            log(f"  {c.row.id} × {c.col.id}: {c.no_data}")
    if count[FAILED] and not retry_failed:
        log(
            f"  {count[FAILED]} failed job(s) are not run again (fix the cause, then add --retry-failed; "
            "make: RETRY_FAILED=1)"
        )
    started = [j for j in todo if j.state == STARTED]
    if started:
        log(
            f"  {len(started)} job(s) have a folder but no result (stopped, or still running from an earlier launch): "
            "they run again and resume from their newest checkpoint"
        )
    broken = check_cells(spec, todo, extra) if todo else {}
    for (row, col), error in broken.items():
        log(f"  {row} × {col}: the configuration does not compose, not launched: {error}")
    todo = [j for j in todo if (j.row.id, j.col.id) not in broken]
    if not todo:
        _report_broken(cells, broken)
        return cells
    settings = launcher_settings(launcher, spec, extra)
    resume = next((o for o in extra if o.startswith("trainer.resume=")), "trainer.resume=auto")
    log(f"launcher {launcher} (conf/hydra/launcher/{launcher}.yaml), the settings every job gets:")
    basic = "Hydra's basic launcher: one job after another, in one process"
    for line in _wrap([f"{k}={v}" for k, v in settings.items()] or [basic]):
        log(f"  {line}")
    log(
        f"  {resume}"
        + (
            " (a requeued, preempted or re-launched job continues from its newest checkpoint)"
            if resume == "trainer.resume=auto"
            else ""
        )
    )
    cmd = sweep_command(spec, todo, launcher, extra, results)
    log(f"{len(todo)} job(s) in one multirun" + (" (one Slurm job array)" if launcher == "slurm" else "") + ":")
    for i, job in enumerate(todo):
        log(f"  #{i} {job.name}: {' '.join(job_overrides(spec, job)[:-4])} -> {display_path(job.run_dir)}")
    if dry_run:
        log(f"command (job presets go to {launch_dir(results, spec) / 'experiment' / JOB_GROUP}/<job>.yaml):")
        log("  " + shlex.join(cmd))
        return cells
    other = running_launch(results, spec)
    if other:
        raise SpecError(
            f"a launch of {spec.name} is still waiting for its jobs (pid {other['pid']}, started "
            f"{other['started']}): let it finish or stop it, then run again"
        )
    write_presets(spec, todo, results)
    for job in todo:  # a retried job's old failure record is kept beside it, so progress reads the new attempt
        if job.state == FAILED:
            (job.run_dir / "results.json").replace(job.run_dir / "results.previous.json")
    sweep_log = results / spec.folder / "sweep.log"
    lock = _lock(results, spec)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "finished": None,
        "launcher": launcher,
        "settings": settings,
        "command": cmd,
        "jobs": [j.name for j in todo],
    }
    lock.write_text(json.dumps(info, indent=2, default=str))
    log(f"launching; the multirun's output goes to {sweep_log}")
    with open(sweep_log, "a") as fh:
        fh.write(f"\n=== {info['started']} {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        try:
            _follow(proc, todo, log, poll_s)
        finally:
            if proc.poll() is None:  # interrupted while waiting: stop the multirun (submitted Slurm jobs run on)
                proc.terminate()
                proc.wait()
            info.update(finished=time.strftime("%Y-%m-%d %H:%M:%S"), returncode=proc.returncode)
            lock.write_text(json.dumps(info, indent=2, default=str))
    cells = plan(spec, seeds, results, data_root(extra))
    states = {j.name: j for j in all_jobs(cells)}
    unfinished = [states[j.name] for j in todo if states[j.name].state in (STARTED, TODO)]
    if proc.returncode != 0 and not any(states[j.name].state == FAILED for j in todo):
        tail = sweep_log.read_text().splitlines()[-15:]
        log(
            f"the multirun exited with {proc.returncode} without a failed job recorded; its last lines "
            f"({sweep_log}):\n    " + "\n    ".join(tail)
        )
    if unfinished:
        log(
            f"{len(unfinished)} launched job(s) have no result yet: "
            + ", ".join(j.name for j in unfinished[:8])
            + (" …" if len(unfinished) > 8 else "")
        )
    _report_broken(cells, broken)
    return cells


def display_path(path: Path) -> str:
    """``path`` relative to the working folder when it lies inside it, else as it is."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)
    return str(path) if rel.startswith("..") else rel


def _wrap(items: list[str], width: int = 110) -> list[str]:
    lines, line = [], ""
    for item in items:
        if line and len(line) + 1 + len(item) > width:
            lines.append(line)
            line = item
        else:
            line = f"{line} {item}".strip()
    return lines + ([line] if line else [])


def _report_broken(cells: list[CellPlan], broken: dict) -> None:
    """Mark the jobs of cells that do not compose as failed (in the returned plan only; nothing is written)."""
    for job in all_jobs(cells):
        if (job.row.id, job.col.id) in broken and job.state != DONE:
            reason = broken[(job.row.id, job.col.id)]
            job.state, job.error = FAILED, f"the cell's configuration does not compose: {reason}"


def _follow(proc: subprocess.Popen, jobs: list[Job], log, poll_s: float) -> None:
    """Wait for the multirun, saying how many of its jobs have finished whenever that changes."""
    last = None
    while True:
        try:
            proc.wait(timeout=poll_s)
            finished = True
        except subprocess.TimeoutExpired:
            finished = False
        states = [job_state(j.run_dir)[0] for j in jobs]
        now = (states.count(DONE), states.count(FAILED), states.count(STARTED))
        if now != last and not finished:
            log(f"  [{time.strftime('%H:%M:%S')}] {now[0]}/{len(jobs)} done, {now[1]} failed, {now[2]} started")
            last = now
        if finished:
            return


def failure_lines(cells: list[CellPlan]) -> list[str]:
    """One line per failed job: cell, seed, error, log."""
    lines = []
    for job in all_jobs(cells):
        if job.state == FAILED:
            where = job.log_path if job.log_path.exists() else job.run_dir / "results.json"
            lines.append(f"  {job.describe()}: {job.error} (log: {display_path(where)})")
    return lines


def run_analyses(spec: TableSpec, cells: list[CellPlan], seeds: list[int], log=print) -> None:
    """Probe / robustness / estimator analyses the spec needs, for finished runs that lack them."""
    from onthefly.analyse import analyse

    kinds = spec.analyses()
    if not kinds:
        return
    for cell in cells:
        for s in seeds:
            run_dir = cell.cell_dir / f"seed{s}"
            if not run_ok(run_dir):
                continue
            for kind in sorted(kinds):
                if not (run_dir / f"{kind}.json").exists():
                    log(f"  {kind}: {run_dir}")
                    analyse(kind, run_dir)
