"""Evaluation passes: a split's fused metrics and per-modality accuracy (:func:`evaluate`), its features (for the
linear probe and robustness), and the probe and robustness computations themselves."""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
import torch.nn.functional as F

from onthefly.engine.metrics import accuracy
from onthefly.models.fusion import EstimatorUnavailable
from onthefly.progress import bar as progress_bar
from onthefly.tasks import Classification, Task


def move(value, device: torch.device, non_blocking: bool = False):
    """A tensor, or a dict of tensors (a feature sequence, a question), on ``device``."""
    if isinstance(value, dict):
        return {k: move(v, device, non_blocking) for k, v in value.items()}
    return value.to(device, non_blocking=non_blocking)


def to_device(batch: dict, keys: Iterable[str], device: torch.device):
    """(inputs {key: value on device} for ``keys`` present in the batch, labels on device)."""
    non_blocking = device.type == "cuda"
    inputs = {k: move(batch[k], device, non_blocking) for k in keys if k in batch}
    return inputs, batch["label"].to(device, non_blocking=non_blocking)


def iterate(loader, keys, device, limit: Optional[int] = None, with_index: bool = False):
    """(inputs, labels) batches on ``device``; ``keys``: the batch entries to move (``model.input_keys``).
    ``with_index``: (inputs, labels, sample indices) (every dataset's items carry their "index")."""
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        inputs, labels = to_device(batch, keys, device)
        if with_index:
            yield inputs, labels, torch.as_tensor(batch["index"]).to(device)
        else:
            yield inputs, labels


@torch.no_grad()
def extract_features(
    model, loader, device, limit: Optional[int] = None, progress: bool = False, desc: str = "evaluate"
):
    """The encoded split: ({key: [N, ...]}, labels [N]) in eval mode. Keys: the modalities' features, context
    encodings and passed-through side targets (everything :meth:`MultimodalModel.encode` returns).
    ``progress``: a progress bar over the batches (drawn only on a terminal, :mod:`onthefly.progress`)."""
    model.eval()
    feats, labels = {}, []
    total = len(loader) if limit is None else min(limit, len(loader))
    batches = progress_bar(
        iterate(loader, model.input_keys, device, limit),
        enabled=progress,
        total=total,
        desc=desc,
        unit="batch",
        leave=False,
    )
    for inputs, y in batches:
        collect(feats, model.encode(inputs))
        labels.append(y)
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels)


def collect(store: dict[str, list], encoded: Dict[str, torch.Tensor]) -> None:
    """Append one batch's encoding to ``store`` (floating tensors in float32; side targets as they are)."""
    for k, f in encoded.items():
        store.setdefault(k, []).append(f.float() if f.is_floating_point() else f)


@torch.no_grad()
def metrics_from_features(
    head, feats: Dict[str, torch.Tensor], labels: torch.Tensor, estimator, task: Optional[Task] = None
) -> Dict[str, float]:
    """The task's metrics of the fused prediction, plus ``acc_<modality>`` from the uni-modal logits."""
    task = task or Classification()
    outputs = head(feats)
    out = task.metrics(outputs, labels, feats)
    if len(head.modalities) > 1:
        try:
            for m, z in head.unimodal_logits(feats, estimator).items():
                out[f"acc_{m}"] = accuracy(task.class_logits(z), labels)
        except EstimatorUnavailable:
            pass
    return out


def evaluate(
    model,
    loader,
    device,
    estimator,
    limit: Optional[int] = None,
    task: Optional[Task] = None,
    progress: bool = False,
    desc: str = "evaluate",
) -> Dict[str, float]:
    """The task's metrics of ``loader``'s split (see :func:`metrics_from_features`), with a progress bar over its
    batches when ``progress`` (and stderr is a terminal)."""
    feats, labels = extract_features(model, loader, device, limit, progress, desc)
    return metrics_from_features(model.head, feats, labels, estimator, task)


L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int):
    w = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(x @ w + b, y) + l2 * (w**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    l2_grid: Iterable[float] = L2_GRID,
    max_iter: int = 200,
) -> dict:
    """A linear classifier on frozen features (CVPR Fig. 1): L2-regularised logistic regression (L-BFGS) on
    standardised train features, the L2 strength chosen on val, accuracy reported on test.

    Returns {"acc": test accuracy, "val_acc": its val accuracy, "l2": the chosen strength}.
    """
    (xtr, ytr), (xva, yva), (xte, yte) = train, val, test
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xva, xte = ((x.float() - mean) / std for x in (xtr, xva, xte))
    best = None
    for l2 in l2_grid:
        w, b = _fit_logistic(xtr, ytr, num_classes, l2, max_iter)
        val_acc = accuracy(xva @ w + b, yva)
        if best is None or val_acc > best[0]:
            best = (val_acc, l2, w, b)
    val_acc, l2, w, b = best
    return {"acc": accuracy(xte @ w + b, yte), "val_acc": val_acc, "l2": l2}


@torch.no_grad()
def robustness_curve(
    head,
    feats: Dict[str, torch.Tensor],
    labels: torch.Tensor,
    modality: str,
    ratios: Iterable[float],
    seed: int = 0,
    task: Optional[Task] = None,
) -> list[float]:
    """Fused accuracy when ``modality``'s feature is zeroed for a fraction r of test samples (same order for
    every r, so the removed sets are nested)."""
    task, n = task or Classification(), len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(labels.device)
    accs = []
    for r in ratios:
        removed = torch.zeros(n, dtype=torch.bool, device=labels.device)
        removed[order[: int(round(r * n))]] = True
        f = dict(feats)
        gone = removed.view(-1, *([1] * (f[modality].dim() - 1)))  # features of any rank (tokens: [N, T, d])
        f[modality] = torch.where(gone, torch.zeros_like(f[modality]), f[modality])
        accs.append(accuracy(task.class_logits(head(f)), labels))
    return accs
