"""UMT and UME, uni-modal teachers and the uni-modal ensemble (Du et al., ICML 2023; docs/method.md, "Zoo methods,
part 1a").

UME trains one linear head per modality on its own encoder (no fused loss) and predicts with the mean of their
logits: the head is wrapped in ``setup``, so best.pt, evaluation and the analyses predict with the ensemble.

UMT first trains a uni-modal model per modality (Stage 1: plain runs of the same loop with
``trainer.modalities=[m]``, or checkpoints the user names), then trains the multimodal model with
CE + λ·Σ_m MSE(φ_m, φ_m^teacher) on the encoder outputs, the teachers frozen in eval mode.
"""

from __future__ import annotations

import copy
import enum
import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from onthefly.config import ConfigError, NonNegativeFloat, NonNegativeInt, PositiveInt, configurable
from onthefly.models.fusion import FusionHead
from onthefly.modulation.base import EpochWindow, Modulation, StepContext
from onthefly.modulation.helpers import UnimodalHeads
from onthefly.modulation.zoo import Variant

log = logging.getLogger("onthefly")


# --- UME ---------------------------------------------------------------------------------------------------------
class Combine(str, enum.Enum):
    logits = "logits"  # mean of the uni-modal logits
    probs = "probs"  # log of the mean of the uni-modal softmax outputs


class EnsembleHead(FusionHead):
    """One linear classifier per modality; the prediction combines them (mean logits, or log mean probabilities).
    Uni-modal logits: each classifier's own."""

    natural_estimator = "branch"

    def __init__(self, feature_dims: Dict[str, int], num_classes: int, combine: Combine | str = Combine.logits):
        super().__init__(feature_dims, num_classes)
        self.heads = UnimodalHeads(feature_dims, num_classes)
        self.combine = Combine(combine)

    def natural_unimodal(self, feats):
        return self.heads(feats)

    def forward(self, feats):
        z = torch.stack(list(self.natural_unimodal(feats).values()))
        if self.combine is Combine.logits:
            return z.mean(0)
        return torch.logsumexp(torch.log_softmax(z.float(), dim=-1), dim=0) - torch.log(torch.tensor(float(len(z))))


@configurable("modulation")
class UME(Modulation):
    """Uni-modal ensemble: Σ_m CE(g_m(φ_m)) trains each encoder with its own head (the fused loss is off); the
    model predicts with the heads' ensemble (``combine``)."""

    def __init__(self, combine: Combine = Combine.logits):
        self.combine = Combine(combine)

    def setup(self, model, num_classes: int) -> None:
        if not isinstance(model.head, EnsembleHead):
            device = next(model.parameters()).device
            model.head = EnsembleHead(model.feature_dims, num_classes, self.combine).to(device)

    def after_forward(self, ctx: StepContext) -> None:
        labels = ctx.labels.long()
        heads = ctx.model.head.heads
        ctx.loss_weight = 0.0  # the fused loss is off: each modality learns alone
        losses = []
        for m in ctx.modalities:
            loss = F.cross_entropy(heads[m](ctx.features[m]), labels)
            ctx.extra_losses[f"ume_{m}"] = loss
            losses.append(loss.detach().float())
        ctx.log_per_modality("ume_loss", torch.stack(losses))


# --- UMT ---------------------------------------------------------------------------------------------------------
def load_teacher(encoder: nn.Module, source: Path | str, modality: str) -> None:
    """Load modality ``modality``'s encoder weights from a run folder (its best.pt) or a checkpoint file of
    onthefly (``{"model": state_dict}``) into ``encoder``. Read with weights_only=True: nothing in the file runs."""
    path = Path(source)
    if path.is_dir():
        path = path / "best.pt"
    if not path.exists():
        raise ConfigError(
            f"UMT teacher for {modality!r}: {path} not found. Give a run folder of a finished uni-modal run "
            f"(`python -m onthefly.train trainer.modalities=[{modality}]`) or its best.pt, or leave "
            f"modulation.teachers.{modality} out to train the teacher first."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (a damaged or foreign file)
        raise ConfigError(
            f"UMT teacher for {modality!r}: {path} is not a readable weights-only checkpoint ({err}); "
            "retrain the uni-modal run or point to its best.pt."
        ) from err
    state = state.get("model", state) if isinstance(state, dict) else state
    prefix = f"encoders.{modality}."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)} if isinstance(state, dict) else {}
    if not weights:
        raise ConfigError(
            f"UMT teacher for {modality!r}: {path} holds no {modality} encoder (keys "
            f"'encoders.{modality}.*'); point to a run trained with trainer.modalities=[{modality}]."
        )
    try:
        encoder.load_state_dict(weights)
    except RuntimeError as err:
        raise ConfigError(
            f"UMT teacher for {modality!r}: the encoder in {path} does not match this run's "
            f"{modality} encoder (the teacher must use the same backbone): {err}"
        ) from err


def distill_losses(student: Dict[str, torch.Tensor], teacher: Dict[str, torch.Tensor]) -> torch.Tensor:
    """MSE_m = mean over batch and feature of (φ_m − φ_m^T)², the teacher's features as constants; [M]."""
    return torch.stack([F.mse_loss(student[m].float(), teacher[m].detach().float()) for m in student])


@configurable("modulation")
class UMT(Modulation):
    """Uni-modal teachers. ``teachers``: {modality: run folder or best.pt} of uni-modal runs; a modality left out
    gets its teacher trained first as a plain run of this configuration with ``trainer.modalities=[m]`` (in
    <run>/prerequisites/teacher_<m>/, reused when it finished), unless ``train_teachers`` is false.
    ``variant=balancebenchmark`` keeps the teachers in train mode (BatchNorm uses and updates batch statistics),
    as the benchmark does; ``official`` (the default) runs them in eval mode."""

    def __init__(
        self,
        weight: NonNegativeFloat = 10.0,
        teachers: Dict[str, str] = {},  # noqa: B006
        train_teachers: bool = True,
        teacher_epochs: Optional[PositiveInt] = None,
        start: NonNegativeInt = 0,
        end: Optional[NonNegativeInt] = None,
        variant: Variant = Variant.official,
    ):
        self.weight, self.teachers = float(weight), dict(teachers or {})
        self.train_teachers, self.teacher_epochs = bool(train_teachers), teacher_epochs
        self.window, self.variant = EpochWindow(start, end), Variant(variant)
        self.nets: Optional[nn.ModuleDict] = None
        self.ready = False

    def setup(self, model, num_classes: int) -> None:
        self.modalities = list(model.modalities)
        unknown = sorted(set(self.teachers) - set(self.modalities))
        if unknown:
            raise ConfigError(
                f"modulation.teachers names {unknown}, which this model does not have ({self.modalities})"
            )
        self.nets = nn.ModuleDict({m: copy.deepcopy(model.encoders[m]) for m in self.modalities})
        self.nets.requires_grad_(False)
        self.nets.train(self.variant is Variant.balancebenchmark)

    def prerequisites(self) -> Dict[str, Dict[str, Any]]:
        missing = [m for m in self.modalities if m not in self.teachers]
        if missing and not self.train_teachers:
            raise ConfigError(
                f"UMT needs a uni-modal teacher per modality and has none for {missing}: pass "
                + " ".join(f"+modulation.teachers.{m}=<run folder or best.pt>" for m in missing)
                + f" (train one with `python -m onthefly.train trainer.modalities=[{missing[0]}]`), or set "
                "modulation.train_teachers=true to train them before this run."
            )
        changes = {} if self.teacher_epochs is None else {"trainer.epochs": int(self.teacher_epochs)}
        return {f"teacher_{m}": {"trainer.modalities": [m], **changes} for m in missing}

    def use_prerequisites(self, runs: Dict[str, Any]) -> None:
        for m in self.modalities:
            source = self.teachers.get(m) or runs[f"teacher_{m}"]
            load_teacher(self.nets[m], source, m)
            results = Path(source) / "results.json"
            if results.exists():
                test = json.loads(results.read_text()).get("test", {})
                log.info("UMT teacher %s: %s (test acc %s)", m, source, test.get("acc"))
        self.ready = True

    def after_forward(self, ctx: StepContext) -> None:
        if not self.ready:
            raise RuntimeError(
                "UMT has no teachers loaded: it trains through onthefly's run (python -m onthefly.train "
                "modulation=umt), which trains or loads them before the first step."
            )
        if ctx.epoch not in self.window:
            return
        with torch.no_grad():
            teacher = {m: self.nets[m](ctx.inputs[m]) for m in ctx.modalities}
        mse = distill_losses({m: ctx.features[m] for m in ctx.modalities}, teacher)
        for i, m in enumerate(ctx.modalities):
            ctx.extra_losses[f"umt_distill_{m}"] = self.weight * mse[i]
        ctx.log_per_modality("umt_mse", mse.detach())
