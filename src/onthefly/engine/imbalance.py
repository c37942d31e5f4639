"""Imbalance and cost metrics of every run (docs/method.md §15): how much each modality contributes to the fused
prediction (Shapley values), how much the model relies on each modality given the others (conditional
utilisation), and what a training step costs (parameters, FLOPs).

* Shapley contribution, from a split's cached encoder features (head passes, not encoder passes). v(S) is the
  accuracy of the fused prediction when the features of the modalities outside S are zeroed (feature level, as
  the zero-out estimator does); φ_m = Σ_{S ∌ m} |S|!(M-|S|-1)!/M! [v(S ∪ m) - v(S)]. Dataset level: v(∅) is the
  accuracy on all-zero features. Sample level: v_i(S) = |S|·1[correct] (``scaled``, the valuation method's value)
  or 1[correct], with v_i(∅) = 0; reported as the mean over samples.
* Conditional utilisation rate (onthefly.models.utilisation): u(m' | rest) = (A_with - A_without) / A_with, with
  m''s feature replaced by its train-split mean, or the interaction's own mechanism (MMTM).
* Cost: parameters (trainable, including what the method owns) and buffers; the FLOPs of one training step of the
  method (forward, the method's extras, backward; no optimizer update) counted once with torch's
  ``FlopCounterMode`` on a train batch, every state it touches restored afterwards; the FLOPs of an evaluation
  forward per sample.
"""
from __future__ import annotations

import copy
import warnings
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from onthefly.config import MetricWhen, SampleValue
from onthefly.engine import checkpoint as ckpt
from onthefly.models.utilisation import conditional_utilisation
from onthefly.modulation.valuation import sample_shapley, shapley_matrix, subset_correct


# --- Shapley values (the core lives with the valuation method, which re-samples the data by it) -----------------
def shapley_metrics(correct: torch.Tensor, modalities: Sequence[str],
                    sample_value: SampleValue | str = SampleValue.scaled) -> Dict[str, float]:
    """``shapley_<m>`` (dataset level, accuracy units, v(∅) = accuracy on all-zero features) and
    ``shapley_sample_<m>`` (mean per-sample φ) from :func:`subset_correct`'s table."""
    dataset = correct.double().mean(0) @ shapley_matrix(len(modalities)).to(correct.device)
    sample = sample_shapley(correct, sample_value).mean(0)
    out = {}
    for i, m in enumerate(modalities):
        out[f"shapley_{m}"] = float(dataset[i])
        out[f"shapley_sample_{m}"] = float(sample[i])
    return out


def shapley_shares(shapley: Dict[str, float]) -> Dict[str, Optional[float]]:
    """{m: φ_m / Σφ} from {m: φ_m}; None each when the contributions sum to 0 (undefined)."""
    total = sum(shapley.values())
    return {m: (v / total if total != 0 else None) for m, v in shapley.items()}


# --- cost ------------------------------------------------------------------------------------------------------
def parameter_counts(modules: Sequence[Optional[nn.Module]]) -> Dict[str, int]:
    """Trainable and total parameters and buffer elements of ``modules`` (shared tensors counted once)."""
    seen, params, trainable, buffers = set(), 0, 0, 0
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params += p.numel()
                trainable += p.numel() if p.requires_grad else 0
        for b in module.buffers():
            if id(b) not in seen:
                seen.add(id(b))
                buffers += b.numel()
    return {"params": params, "params_trainable": trainable, "buffers": buffers}


class _DryRun:
    """The trainer as a step strategy sees it, except that ``update`` records the step's scalars and takes no
    optimizer step (the FLOP count excludes the update, and the model is left as it was)."""

    def __init__(self, trainer):
        self._trainer = trainer

    def __getattr__(self, name):
        return getattr(self._trainer, name)

    def update(self, ctx, loss: torch.Tensor) -> dict:
        if self._trainer.scaler.is_enabled():
            self._trainer.scaler.update()  # close the sub-step's unscale bookkeeping (the scale is restored after)
        ctx.metrics["loss"] = loss.detach()
        if ctx.logits is not None:
            ctx.metrics["acc"] = (ctx.logits.detach().argmax(1) == ctx.labels).float().mean()
        return {k: float(v) for k, v in ctx.metrics.items()}


def flops_of(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def step_cost(trainer, epochs: Sequence[int]) -> Dict[str, float]:
    """FLOPs of one training step in each of ``epochs`` (the method's step strategy on the first train batch, as
    it runs in that epoch: {"flops_step@<epoch>": n}) and of an evaluation forward per sample. Everything the step
    touches (weights, BatchNorm statistics, gradients, the method's state, the RNG streams, the GradScaler) is
    restored, so the run's numbers do not change."""
    model, method = trainer.model, trainer.modulation
    batch = next(iter(trainer._batches("train", 1, True)), None)
    if batch is None:
        return {}
    inputs, labels, indices = batch
    saved = {"model": copy.deepcopy(model.state_dict()), "method": copy.deepcopy(method.state_dict()),
             "extra": copy.deepcopy(trainer.extra.state_dict()) if trainer.extra is not None else None,
             "rng": ckpt.rng_state(trainer.device), "scaler": copy.deepcopy(trainer.scaler.state_dict()),
             "training": model.training}
    params = [p for m in (model, trainer.extra) if m is not None for p in m.parameters()]
    try:
        train = {}
        for epoch in epochs:
            model.train()
            ctx = trainer._ctx(epoch, 0)
            ctx.phase = trainer.schedule.phase(epoch)
            ctx.inputs, ctx.labels, ctx.indices = inputs, labels, indices
            train[f"flops_step@{epoch}"] = flops_of(lambda: trainer.step_strategy.run(_DryRun(trainer), ctx))
        model.eval()
        with torch.no_grad():
            forward = flops_of(lambda: model.head(model.encode(inputs)))
    finally:
        for p in params:
            p.grad = None
        model.load_state_dict(saved["model"])
        method.load_state_dict(saved["method"])
        if saved["extra"] is not None:
            trainer.extra.load_state_dict(saved["extra"])
        scaler = torch.amp.GradScaler(trainer.device.type, enabled=trainer.scaler.is_enabled())
        scaler.load_state_dict(saved["scaler"])
        trainer.scaler = scaler  # a fresh one with the saved scale: no bookkeeping of the dry step is left
        ckpt.set_rng_state(saved["rng"], trainer.device)
        model.train(saved["training"])
    return {**train, "flops_eval_per_sample": forward / max(len(labels), 1), "step_batch": len(labels)}


# --- what the trainer calls --------------------------------------------------------------------------------------
class ImbalanceMetrics:
    """The run's imbalance and cost metrics, as ``trainer.imbalance`` settings ask (see the module docstring)."""

    def __init__(self, trainer, settings):
        self.trainer, self.settings = trainer, settings
        self.cost: Dict[str, float] = {}
        self.phase_flops: Dict[str, int] = {}  # FLOPs of a step in each phase of the schedule
        self.steps_by_phase: Dict[str, int] = {}  # optimizer steps taken in each phase (checkpointed)
        self._counted_to = 0  # the global step up to which steps_by_phase counts

    @staticmethod
    def _wanted(when: MetricWhen, split: str) -> bool:
        when = MetricWhen(when)
        return when is MetricWhen.every_epoch or (when is MetricWhen.test and split == "test")

    def on_split(self, split: str, feats: Dict[str, torch.Tensor], labels: torch.Tensor) -> Dict[str, float]:
        """The metrics of a split's cached features (called by the trainer's evaluation of val and test)."""
        trainer, s = self.trainer, self.settings
        head, task = trainer.model.head, trainer.task
        if len(getattr(head, "modalities", [])) < 2:
            return {}
        if split == "val":  # once per epoch, after its training: count the epoch's steps by phase
            phase, steps = trainer.phase, trainer.global_step - self._counted_to
            self.steps_by_phase[phase] = self.steps_by_phase.get(phase, 0) + steps
            self._counted_to = trainer.global_step
        out = {}
        if self._wanted(s.shapley, split):
            out.update(shapley_metrics(subset_correct(head, feats, labels, task.class_logits), head.modalities,
                                       s.sample_value))
        if self._wanted(s.utilization, split):
            out.update(self.utilization(split, feats, labels))
        return out

    def utilization(self, split: str, feats: Dict[str, torch.Tensor], labels: torch.Tensor) -> Dict[str, float]:
        """The conditional utilisation rates on ``split`` (onthefly.models.utilisation: the interaction's own
        measure where the model has one, MMTM; else the fused accuracy with a modality's feature replaced by its
        train-split mean): one encoder pass over train and one over the split."""
        trainer = self.trainer
        return conditional_utilisation(trainer.model, trainer._batches("train_eval"), trainer._batches(split),
                                       trainer.task)

    def measure_cost(self) -> None:
        """Parameters and FLOPs per step, once when the first epoch of this process is set up (after its
        epoch_start, so the method's step runs as it will) (``trainer.imbalance.cost``)."""
        if not self.settings.cost:
            return
        trainer = self.trainer
        self.cost = parameter_counts([trainer.model, trainer.extra])
        try:
            self._count_flops()
        except Exception as err:  # noqa: BLE001 (a measurement must not cost the run)
            warnings.warn(f"trainer.imbalance.cost: the FLOPs of a step could not be counted ({type(err).__name__}: "
                          f"{err}); the run goes on without them (trainer.imbalance.cost=false silences this)",
                          stacklevel=2)

    def _count_flops(self) -> None:
        trainer = self.trainer
        start = min(trainer.start_epoch, trainer.tc.epochs - 1)
        last_of_phase = {trainer.schedule.phase(e): e for e in range(trainer.tc.epochs)}  # a phase's steady state
        first = trainer.schedule.phase(start)
        if len(last_of_phase) == 1:
            last_of_phase = {first: start}
        counted = step_cost(trainer, sorted(set(last_of_phase.values())))
        self.phase_flops = {p: counted.pop(f"flops_step@{e}") for p, e in last_of_phase.items() if f"flops_step@{e}" in counted}
        if not self.phase_flops:
            return
        self.cost["flops_per_step"] = self.phase_flops[first]
        if len(self.phase_flops) > 1:
            self.cost.update({f"flops_per_step_{p}": n for p, n in self.phase_flops.items()})
        self.cost.update(counted)

    def state_dict(self) -> dict:
        return {"steps_by_phase": dict(self.steps_by_phase), "counted_to": self._counted_to}

    def load_state_dict(self, state: dict) -> None:
        self.steps_by_phase = dict(state.get("steps_by_phase", {}))
        self._counted_to = int(state.get("counted_to", 0))

    def results(self, results: dict) -> dict:
        """The results.json entries: ``cost`` (parameters, FLOPs, time and memory per step) and ``imbalance``,
        the test split's metrics under the table keys ``shapley/<m>``, ``shapley_share/<m>``,
        ``shapley_sample/<m>``, ``cur/<m'>_given_<m>``, ``cur/d_util`` plus ``cost/<name>``."""
        trainer, out = self.trainer, {}
        if self.settings.cost and not self.cost:  # no epoch ran in this process (a finished run evaluated again)
            self.cost = parameter_counts([trainer.model, trainer.extra])
        cost = dict(self.cost)
        if self.phase_flops and self.steps_by_phase:
            cost["flops_train_total"] = sum(self.phase_flops.get(p, 0) * n for p, n in self.steps_by_phase.items())
        if cost and trainer.global_step:
            cost["time_per_step_s"] = results.get("train_time_s", float("nan")) / trainer.global_step
        if trainer.device.type == "cuda":
            cost["max_memory_mb"] = torch.cuda.max_memory_allocated(trainer.device) / 2**20
        if cost:
            out["cost"] = cost
        table = {}
        test = results.get("test") or {}
        for key, value in test.items():
            for prefix in ("shapley_sample_", "shapley_", "cur_"):
                if key.startswith(prefix):
                    table[f"{prefix[:-1]}/{key[len(prefix):]}"] = value
                    break
            if key == "d_util":
                table["cur/d_util"] = value
        modalities = trainer.modalities
        if all(f"shapley_{m}" in test for m in modalities):
            shares = shapley_shares({m: test[f"shapley_{m}"] for m in modalities})
            table.update({f"shapley_share/{m}": v for m, v in shares.items()})
        table.update({f"cost/{k}": v for k, v in cost.items()})
        if table:
            out["imbalance"] = table
        return out
