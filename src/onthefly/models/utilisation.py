"""Conditional utilisation rate (Wu et al., ICML 2022): how much a model's prediction relies on modality m' given
the other modalities (docs/method.md §10.5).

    u(m'|rest) = (A_with − A_without) / A_with

* a model whose interaction provides ``conditional_utilisation`` (MMTM): A is the accuracy of the other
  modality's own branch, and "without" means m' reaches every transfer module only through its training-set mean
  squeeze (the paper's mechanism);
* any other model: A is the fused accuracy, and "without" means m''s feature is replaced by its training-set mean
  (a mean, not zero).

Keys: ``cur_<m'>_given_<m>`` for two modalities (``cur_<m'>_given_rest`` for more), and for two modalities
``d_util`` = u(m_1|m_0) − u(m_0|m_1) (model order): positive when the model leans on m_1 more than on m_0.
"""

from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional

import torch


def utilisation_rates(
    modalities: list[str], with_m: Mapping[str, float], without_m: Mapping[str, float]
) -> Dict[str, float]:
    """The rates from accuracies keyed by the modality m' whose use is measured: ``with_m[m']`` (m' present) and
    ``without_m[m']`` (m' removed)."""

    def rate(m):
        return (with_m[m] - without_m[m]) / with_m[m] if with_m[m] > 0 else float("nan")

    if len(modalities) == 2:
        m0, m1 = modalities
        out = {f"cur_{m1}_given_{m0}": rate(m1), f"cur_{m0}_given_{m1}": rate(m0)}
        out["d_util"] = out[f"cur_{m1}_given_{m0}"] - out[f"cur_{m0}_given_{m1}"]
        return out
    return {f"cur_{m}_given_rest": rate(m) for m in modalities}


@torch.no_grad()
def conditional_utilisation(model, train_batches: Iterable, eval_batches: Iterable, task=None) -> Dict[str, float]:
    """The conditional utilisation rates of ``model`` on ``eval_batches`` ((inputs, labels) pairs on the model's
    device, e.g. the test split), with the training-set means taken over ``train_batches`` (the train split with
    evaluation transforms). Uses the interaction's own version where it has one (MMTM), else mean replacement.
    Returns {} for a uni-modal model."""
    if len(model.modalities) < 2:
        return {}
    own = getattr(getattr(model, "interaction", None), "conditional_utilisation", None)
    if own is not None:
        return own(model, train_batches, eval_batches, task)
    return mean_replacement_utilisation(model, train_batches, eval_batches, task)


@torch.no_grad()
def mean_replacement_utilisation(model, train_batches: Iterable, eval_batches: Iterable, task=None) -> Dict[str, float]:
    """u(m'|rest) with m''s feature replaced by its training-set mean: fused accuracy with and without."""
    mods = model.modalities
    was = model.training
    model.eval()
    try:
        sums: Dict[str, torch.Tensor] = {}
        n = 0
        for inputs, labels in train_batches:
            feats = model.encode(inputs)
            for m in mods:
                sums[m] = sums.get(m, 0) + feats[m].float().sum(0)
            n += len(labels)
        means = {m: s / max(n, 1) for m, s in sums.items()}
        correct_full, correct_without, total = 0.0, {m: 0.0 for m in mods}, 0
        for inputs, labels in eval_batches:
            feats = model.encode(inputs)
            correct_full += _correct(model.head(feats), labels, task)
            for m in mods:
                replaced = {**feats, m: means[m].to(feats[m].dtype).expand_as(feats[m])}
                correct_without[m] += _correct(model.head(replaced), labels, task)
            total += len(labels)
    finally:
        model.train(was)
    full = correct_full / max(total, 1)
    return utilisation_rates(mods, {m: full for m in mods}, {m: c / max(total, 1) for m, c in correct_without.items()})


def _correct(outputs: torch.Tensor, labels: torch.Tensor, task: Optional[object]) -> float:
    logits = task.class_logits(outputs) if task is not None else outputs
    return float((logits.argmax(1) == labels).sum())
