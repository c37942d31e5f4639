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
* Cost: parameters (trainable, including what the method owns) and buffers; the FLOPs of the first training step
  of each epoch (the method's own step as it runs: forward, the method's extras, backward; the optimizer's
  updates have no FLOP formula in torch's ``FlopCounterMode`` and are not counted), and of an evaluation forward
  per sample.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from onthefly.config import MetricWhen, SampleValue
from onthefly.models.utilisation import conditional_utilisation
from onthefly.modulation.valuation import sample_shapley, shapley_matrix, subset_correct


# --- Shapley values (the core lives with the valuation method, which re-samples the data by it) -----------------
def shapley_metrics(
    correct: torch.Tensor, modalities: Sequence[str], sample_value: SampleValue | str = SampleValue.scaled
) -> Dict[str, float]:
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


def flops_of(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# --- what the trainer calls --------------------------------------------------------------------------------------
class ImbalanceMetrics:
    """The run's imbalance and cost metrics, as ``trainer.imbalance`` settings ask (see the module docstring)."""

    def __init__(self, trainer, settings):
        self.trainer, self.settings = trainer, settings
        self.cost: Dict[str, float] = {}
        self.step_flops: Optional[int] = None  # FLOPs of the current epoch's first step (counted as it ran)
        self.phase_flops: Dict[str, int] = {}  # the latest such count of each phase of the schedule
        self.flops_total = 0  # Σ over finished epochs of first-step FLOPs × the epoch's steps (checkpointed)
        self._counted_to = 0  # the global step up to which flops_total counts

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
        if split == "val":  # once per epoch, after its training: add the epoch's FLOPs
            if self.step_flops is not None:
                self.flops_total += self.step_flops * (trainer.global_step - self._counted_to)
            self._counted_to = trainer.global_step
        out = {}
        if self._wanted(s.shapley, split):
            out.update(
                shapley_metrics(subset_correct(head, feats, labels, task.class_logits), head.modalities, s.sample_value)
            )
        if self._wanted(s.utilization, split):
            out.update(self.utilization(split, feats, labels))
        return out

    def utilization(self, split: str, feats: Dict[str, torch.Tensor], labels: torch.Tensor) -> Dict[str, float]:
        """The conditional utilisation rates on ``split`` (onthefly.models.utilisation: the interaction's own
        measure where the model has one, MMTM; else the fused accuracy with a modality's feature replaced by its
        train-split mean): one encoder pass over train and one over the split."""
        trainer = self.trainer
        return conditional_utilisation(
            trainer.model, trainer._batches("train_eval"), trainer._batches(split), trainer.task
        )

    def counting(self):
        """A context for the first training step of each epoch this process runs: with ``trainer.imbalance.cost``
        it counts that step's FLOPs as it runs (FlopCounterMode only watches: the step is the run's own, nothing is
        run twice). The first time, also the parameters and the FLOPs of an evaluation forward."""
        if not self.settings.cost or self.trainer.tc.compile:  # compiled graphs: not counted
            return contextlib.nullcontext()
        return self._count()

    @contextlib.contextmanager
    def _count(self):
        from torch.utils.flop_counter import FlopCounterMode

        trainer = self.trainer
        if not self.cost:
            self.cost = parameter_counts([trainer.model, trainer.extra])
        counter = FlopCounterMode(display=False)
        with counter:
            yield
        self.step_flops = int(counter.get_total_flops())
        self.phase_flops[trainer.phase] = self.step_flops
        if "flops_per_step" not in self.cost:
            self.cost["flops_per_step"] = self.step_flops
            self.cost.update(self._eval_flops())

    @torch.no_grad()
    def _eval_flops(self) -> Dict[str, float]:
        """FLOPs per sample of an evaluation forward, on one val batch (eval mode: nothing changes)."""
        trainer, model = self.trainer, self.trainer.model
        batch = next(iter(trainer._batches("val", 1)), None)
        if batch is None:
            return {}
        inputs, labels = batch
        was_training = model.training
        model.eval()
        try:
            flops = flops_of(lambda: model.head(model.encode(inputs)))
        finally:
            model.train(was_training)
        return {"flops_eval_per_sample": flops / max(len(labels), 1)}

    def state_dict(self) -> dict:
        return {
            "flops_total": self.flops_total,
            "counted_to": self._counted_to,
            "step_flops": self.step_flops,
            "phase_flops": dict(self.phase_flops),
            "cost": dict(self.cost),
        }

    def load_state_dict(self, state: dict) -> None:
        self.flops_total, self._counted_to = int(state.get("flops_total", 0)), int(state.get("counted_to", 0))
        self.step_flops, self.phase_flops = state.get("step_flops"), dict(state.get("phase_flops", {}))
        self.cost = dict(state.get("cost", {}))

    def results(self, results: dict) -> dict:
        """The results.json entries: ``cost`` (parameters, FLOPs, time and memory per step) and ``imbalance``,
        the test split's metrics under the table keys ``shapley/<m>``, ``shapley_share/<m>``,
        ``shapley_sample/<m>``, ``cur/<m'>_given_<m>``, ``cur/d_util`` plus ``cost/<name>``."""
        trainer, out = self.trainer, {}
        if self.settings.cost and not self.cost:  # no epoch ran in this process (a finished run evaluated again)
            self.cost = parameter_counts([trainer.model, trainer.extra])
        cost = dict(self.cost)
        if len(self.phase_flops) > 1:
            cost.update({f"flops_per_step_{p}": n for p, n in self.phase_flops.items()})
        if self.flops_total:
            cost["flops_train_total"] = self.flops_total
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
                    table[f"{prefix[:-1]}/{key[len(prefix) :]}"] = value
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
