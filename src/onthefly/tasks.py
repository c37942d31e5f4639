"""What a run predicts, how it is scored and which metrics it reports: the ``task`` config group.

The loop and the evaluation never name a loss or a metric themselves; they ask the task. A task maps the
head's outputs to

* a per-sample training loss (:meth:`Task.loss`),
* class logits (:meth:`Task.class_logits`): what the discrepancy ratio ρ, the uni-modal accuracies and the
  training accuracy are computed from (docs/method.md §2 needs a softmax over classes), and
* evaluation metrics (:meth:`Task.metrics`), always with ``loss`` and ``acc`` (``acc`` selects the checkpoint).

Side targets a task reads (MOSI's continuous ``score``, AVQA's ``qtype`` and ``relation``) are per-sample
entries of the batch that the dataset declares in ``DataSplits.targets``; the model passes them through into
its feature dict unchanged, so they travel with the features through sharded evaluation.

Tasks:
    classification   cross-entropy; accuracy, macro mAP, and accuracy per value of every categorical side target
                     (AVQA: per question type and relation)
    sentiment        CMU-MOSI: a 2-class head (y >= 0) or a regression head on the score in [-3, 3];
                     Acc-2 and weighted F1 with and without neutral (score 0) segments; regression: MAE,
                     Pearson correlation, Acc-7
"""

from __future__ import annotations

import abc
import enum
from typing import Dict

import torch
import torch.nn.functional as F

from onthefly.config import configurable
from onthefly.engine.metrics import accuracy, binary_scores, macro_map, pearson, seven_class_accuracy


class Task(abc.ABC):
    """The interface, with the class-logit defaults: outputs are class logits, the loss is cross-entropy.
    Subclasses say which metrics they report."""

    target_names: Dict[str, list[str]] = {}  # set by setup(); empty until then
    target_keys: list[str] = []

    def setup(self, splits) -> None:
        """Called once with the dataset splits, before the model is built."""
        self.target_names: Dict[str, list[str]] = dict(getattr(splits, "target_names", {}) or {})
        self.target_keys: list[str] = list(getattr(splits, "targets", []) or [])
        self.num_classes = splits.num_classes

    def output_dim(self, num_classes: int) -> int:
        return num_classes

    def class_logits(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample loss [B] (the loop weights and averages it)."""
        return F.cross_entropy(outputs, labels, reduction="none")

    @abc.abstractmethod
    def metrics(self, outputs: torch.Tensor, labels: torch.Tensor, batch: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """Evaluation metrics of a whole split; always ``loss`` and ``acc`` (``acc`` selects the checkpoint)."""


@configurable("task")
class Classification(Task):
    """Cross-entropy over the classes; accuracy, macro mAP (``map``) and, for every categorical side target
    the dataset names (AVQA's question type and relation), accuracy within each of its values
    (``acc_<target>_<value>``)."""

    def __init__(self, per_group: bool = True):
        self.per_group = per_group

    def metrics(self, outputs, labels, batch):
        out = {
            "loss": float(F.cross_entropy(outputs.float(), labels)),
            "acc": accuracy(outputs, labels),
            "map": macro_map(outputs, labels),
        }
        if self.per_group:
            correct = outputs.argmax(1) == labels
            for key, names in self.target_names.items():
                if key not in batch:
                    continue
                values = batch[key]
                for i, name in enumerate(names):
                    chosen = values == i
                    if bool(chosen.any()):
                        out[f"acc_{key}_{_slug(name)}"] = float(correct[chosen].double().mean())
        return out


class SentimentHead(str, enum.Enum):
    classification = "classification"  # 2 logits, cross-entropy on y >= 0 (the lab's benchmark)
    regression = "regression"  # 1 output, L1 loss on the score (the MOSI literature's usual head)


@configurable("task")
class Sentiment(Task):
    """CMU-MOSI. ``head=classification``: 2 logits trained with cross-entropy on the label y = [score >= 0].
    ``head=regression``: one output trained with an L1 loss on the continuous score; its class logits (for ρ and
    accuracy) are [0, ŷ], so the positive-class probability is sigmoid(ŷ).

    Metrics: ``acc`` = Acc-2 and ``f1`` = weighted F1 over all segments (score >= 0 counts as positive);
    ``acc_nonzero`` / ``f1_nonzero`` over the segments whose score is not 0 (positive: score > 0; a regression
    prediction is positive when ŷ > 0); with a regression head also ``mae``, ``corr`` (Pearson) and ``acc7``
    (scores and predictions clipped to [-3, 3] and rounded).
    """

    def __init__(self, head: SentimentHead = SentimentHead.classification, score_key: str = "score"):
        self.head = SentimentHead(head)
        self.score_key = score_key

    def setup(self, splits) -> None:
        super().setup(splits)
        if splits.num_classes != 2:
            raise ValueError(
                f"task=sentiment needs a 2-class dataset (y >= 0 vs y < 0); this one has {splits.num_classes} classes"
            )
        if self.score_key not in self.target_keys:
            raise ValueError(
                f"task=sentiment reads the per-sample '{self.score_key}', which this dataset does not "
                f"provide (its targets: {self.target_keys}); use task=classification"
            )

    @property
    def regression(self) -> bool:
        return self.head is SentimentHead.regression

    def output_dim(self, num_classes: int) -> int:
        return 1 if self.regression else num_classes

    def class_logits(self, outputs):
        if not self.regression:
            return outputs
        return torch.cat([torch.zeros_like(outputs), outputs], dim=1)

    def loss(self, outputs, labels, batch):
        if not self.regression:
            return super().loss(outputs, labels, batch)
        score = batch[self.score_key].to(outputs.dtype)
        return (outputs[:, 0] - score).abs()

    def metrics(self, outputs, labels, batch):
        score = batch[self.score_key].float()
        outputs = outputs.float()
        if self.regression:
            pred = outputs[:, 0]
            out = {"loss": float((pred - score).abs().mean())}
            pos_all, pos_nonzero = pred >= 0, pred > 0
        else:
            out = {"loss": float(F.cross_entropy(outputs, labels))}
            pos_all = pos_nonzero = outputs.argmax(1) == 1
        out["acc"], out["f1"] = binary_scores(pos_all, score >= 0)
        nonzero = score != 0
        out["acc_nonzero"], out["f1_nonzero"] = binary_scores(pos_nonzero[nonzero], score[nonzero] > 0)
        if self.regression:
            out["mae"] = float((pred - score).abs().mean()) if len(score) else float("nan")
            out["corr"] = pearson(pred, score)
            out["acc7"] = seven_class_accuracy(pred, score)
        return out


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in str(name).strip().lower()).strip("_") or "none"


def build_task(cfg, splits) -> Task:
    """The run's task from ``cfg.task``, set up for ``splits``."""
    from hydra.utils import instantiate

    task: Task = instantiate(cfg.task) if "task" in cfg and cfg.task is not None else Classification()
    task.setup(splits)
    return task
