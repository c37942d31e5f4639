"""The names of everything a run logs, decided once (the tables and the plots read them from here).

Local files (one row per ...):

=================  =============================================================================================
steps.csv          optimizer step: ``step`` (global step, from 1), ``epoch``, then ``train/<scalar>``: the step's
                   loss, acc and the method's diagnostics (``rho_<m>``, ``k_<m>``, ``q_<m>``, ...), each the mean
                   over ranks. Written as the steps come (flushed every few steps and on any exit).
metrics.csv        epoch: ``epoch``, ``lr``, ``train/<scalar>`` (the epoch's MEAN of the step values), ``val/<metric>``
                   (the task's metrics on val, ``acc_<m>`` per modality), ``time/epoch_s``; then one last row,
                   ``epoch`` = trainer.epochs, with the selected checkpoint's ``test/<metric>`` (its other columns
                   empty).
results.json       the run: ``best`` {epoch, score, split}, ``test`` {metric: value of the selected checkpoint},
                   ``last`` (the last epoch's row), status, times, config, ``wandb`` {id, project, group, ...};
                   ``cost`` (parameters, FLOPs per step) and ``imbalance`` (the test split's Shapley and utilisation
                   values under ``shapley/<m>``, ``cur/<m'>_given_<m>``, ... and ``cost/<name>``: docs/method.md §15).
=================  =============================================================================================

W&B (each key has one meaning and one x-axis, see :data:`WANDB_AXES`):

=================  =============================================================================================
history, per step  ``train/<scalar>`` at W&B step = global step (the values of steps.csv)
history, per epoch ``epoch``, and at x = ``epoch``: ``train_epoch/<scalar>`` (the epoch means, metrics.csv's
                   ``train/*``), ``train_epoch/lr``, ``val/<metric>``, ``time/epoch_s``
summary            the SELECTED checkpoint: ``best/epoch``, ``best/score`` (its val accuracy, or the selection
                   split's), ``best/split``; ``val/<metric>`` and ``train_epoch/<scalar>`` of that epoch;
                   ``test/<metric>`` of that checkpoint (test metrics are never history rows); ``train_time_s``,
                   ``nonfinite_steps``; results.json's ``imbalance`` keys (``shapley/<m>``, ``cost/<name>``, ...)
=================  =============================================================================================
"""

from __future__ import annotations

STEP = "step"  # steps.csv: the global optimizer step (W&B: the history step of per-step rows)
EPOCH = "epoch"  # metrics.csv / W&B: the epoch index, from 0
LR = "lr"  # metrics.csv: the learning rate of the epoch

TRAIN = "train/"  # per-step training scalars (steps.csv, W&B per step); their epoch means in metrics.csv
TRAIN_EPOCH = "train_epoch/"  # W&B: the epoch means of the per-step scalars (metrics.csv's train/*)
VAL = "val/"  # per-epoch validation metrics
TEST = "test/"  # the selected checkpoint's test metrics (metrics.csv's last row, results.json, W&B summary)
BEST = "best/"  # W&B summary: the selection (epoch, score, split)
TIME = "time/"  # per-epoch wall times
PLOTS = "plots/"  # W&B: the run's figures, logged once at the end

# W&B: which history keys are plotted against which step metric (a glob -> its x-axis). Per-step keys use W&B's
# own step (= the global step), so they need no entry. test/* is a history key only with trainer.select_on=test
# (then it is computed every epoch); otherwise it is in the summary alone.
WANDB_AXES = {f"{TRAIN_EPOCH}*": EPOCH, f"{VAL}*": EPOCH, f"{TIME}*": EPOCH, f"{TEST}*": EPOCH}


def epoch_row_for_wandb(row: dict) -> dict:
    """A metrics.csv epoch row under its W&B names: ``train/x`` -> ``train_epoch/x``, ``lr`` ->
    ``train_epoch/lr``; ``epoch``, ``val/*`` and ``time/*`` unchanged."""
    out = {}
    for key, value in row.items():
        if key.startswith(TRAIN):
            key = TRAIN_EPOCH + key[len(TRAIN) :]
        elif key == LR:
            key = TRAIN_EPOCH + LR
        out[key] = value
    return out


def summary_for_wandb(results: dict, history: list[dict]) -> dict:
    """The W&B summary of a finished run (see the module docstring): the selected epoch's row, its test metrics."""
    best = results.get("best") or {}
    out = {f"{BEST}{k}": v for k, v in best.items()}
    chosen = next((r for r in history if r.get(EPOCH) == best.get("epoch")), None)
    if chosen is not None:
        out.update({k: v for k, v in epoch_row_for_wandb(chosen).items() if k.startswith((TRAIN_EPOCH, VAL))})
    out.update({f"{TEST}{k}": v for k, v in (results.get("test") or {}).items()})
    for key in ("train_time_s", "nonfinite_steps", "overflow_steps"):
        if key in results:
            out[key] = results[key]
    out.update(results.get("imbalance") or {})  # shapley/<m>, cur/..., cost/<name> (docs/method.md §15)
    return out
