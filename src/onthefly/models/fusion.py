"""Fusion heads. Each maps per-modality features to class logits and can give uni-modal logits (docs/method.md §1).

Every head supports the generic zero-out estimator (the head applied with every other modality's feature set to
zero, one batched head forward for all modalities). A head with a cheaper exact estimator overrides
:meth:`FusionHead.natural_unimodal`; one without sets ``natural_estimator = None``.
"""

from __future__ import annotations

import enum
from typing import Dict, Optional

import torch
from torch import nn

from onthefly.config import DropoutRate, Estimator, PositiveInt, configurable
from onthefly.models.encoders import init_weights


class EstimatorUnavailable(RuntimeError):
    pass


class FusionHead(nn.Module):
    natural_estimator: Optional[str] = "zero_out"  # name of the head's own estimator; None: zero-out only

    def __init__(self, feature_dims: Dict[str, int], num_classes: int):
        super().__init__()
        self.modalities = list(feature_dims)
        self.feature_dims = dict(feature_dims)
        self.num_classes = num_classes

    def natural_unimodal(self, feats: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return self.zero_out_unimodal(feats)

    def zero_out_unimodal(self, feats: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """z_m = head(features with every modality but m zeroed), all modalities in one head forward."""
        mods, b = self.modalities, feats[self.modalities[0]].shape[0]
        stacked = {m: torch.cat([feats[m] if m == keep else torch.zeros_like(feats[m]) for keep in mods]) for m in mods}
        # context (a question) and side entries are kept as they are, once per modality
        stacked.update({k: torch.cat([v] * len(mods)) for k, v in feats.items() if k not in stacked})
        return dict(zip(mods, self.forward(stacked).split(b)))

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        """The head's parameters that act on ``modality`` alone (a per-branch classifier); [] if none."""
        return []

    def training_terms(self, ctx, task) -> None:
        """Called once per training step after the fused logits: a head with loss terms of its own (CentralNet's
        branch losses) adds them to ``ctx.extra_losses`` and may log into ``ctx.metrics``. Default: none."""

    def unimodal_logits(self, feats: Dict[str, torch.Tensor], estimator: Estimator | str = Estimator.natural):
        if Estimator(estimator) is Estimator.zero_out:
            return self.zero_out_unimodal(feats)
        if self.natural_estimator is None:
            raise EstimatorUnavailable(
                f"fusion head {type(self).__name__} has no natural uni-modal estimator; "
                "set discrepancy.estimator=zero_out to estimate each modality by zeroing the others."
            )
        return self.natural_unimodal(feats)


@configurable("fusion", runtime=("feature_dims", "num_classes"))
class ConcatFusion(FusionHead):
    """f = W [φ_1; ...; φ_M] + b. Uni-modal: z_m = W_m φ_m + b / M (the W-slice estimator)."""

    natural_estimator = "w_slice"

    def __init__(self, feature_dims: Dict[str, int], num_classes: int):
        super().__init__(feature_dims, num_classes)
        self.fc = nn.Linear(sum(feature_dims.values()), num_classes)
        init_weights(self)

    def forward(self, feats):
        return self.fc(torch.cat([feats[m] for m in self.modalities], dim=1))

    def natural_unimodal(self, feats):
        weights = self.fc.weight.split([self.feature_dims[m] for m in self.modalities], dim=1)
        bias = self.fc.bias / len(self.modalities)
        return {m: feats[m] @ w.t() + bias for m, w in zip(self.modalities, weights)}


@configurable("fusion", runtime=("feature_dims", "num_classes"))
class SumFusion(FusionHead):
    """f = Σ_m (W_m φ_m + b_m). Uni-modal: z_m = W_m φ_m + b_m (per-branch)."""

    natural_estimator = "branch"

    def __init__(self, feature_dims: Dict[str, int], num_classes: int):
        super().__init__(feature_dims, num_classes)
        self.fc = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in feature_dims.items()})
        init_weights(self)

    def forward(self, feats):
        return sum(self.fc[m](feats[m]) for m in self.modalities)

    def natural_unimodal(self, feats):
        return {m: self.fc[m](feats[m]) for m in self.modalities}


@configurable("fusion", runtime=("feature_dims", "num_classes"))
class LateAverageFusion(FusionHead):
    """f = (1/M) Σ_m (W_m φ_m + b_m): one classifier per modality, logits averaged (the MMTM and Greedy models).
    Uni-modal: each branch's own logits, not divided by M."""

    natural_estimator = "branch"

    def __init__(self, feature_dims: Dict[str, int], num_classes: int):
        super().__init__(feature_dims, num_classes)
        self.branch = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in feature_dims.items()})
        init_weights(self)

    def forward(self, feats):
        return sum(self.branch[m](feats[m]) for m in self.modalities) / len(self.modalities)

    def natural_unimodal(self, feats):
        return {m: self.branch[m](feats[m]) for m in self.modalities}

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        return list(self.branch[modality].parameters())


class FusionLevel(str, enum.Enum):
    logit = "logit"  # the conditioning acts on per-modality branch logits (our default heads)
    feature = "feature"  # the conditioning acts on the features, as the CVPR 2022 release builds FiLM and gated


class _TwoModalityHead(FusionHead):
    """Heads in which one modality (``condition``) modulates the other (the target).

    ``level=logit``: on per-branch logits z_m = W_m φ_m + b_m, which are also the uni-modal logits (``branch``
    estimator). ``level=feature``: on the features themselves, as the CVPR 2022 release builds these heads (docs/method.md
    §9); there is no per-modality branch, so the uni-modal logits are zero-out estimates (the release's W-slice of
    its output layer does not fit these shapes).
    """

    natural_estimator = "branch"

    def __init__(
        self,
        feature_dims: Dict[str, int],
        num_classes: int,
        condition: Optional[str] = None,
        level: FusionLevel = FusionLevel.logit,
    ):
        super().__init__(feature_dims, num_classes)
        if len(feature_dims) != 2:
            raise ValueError(
                f"{type(self).__name__} fuses exactly two modalities, got {list(feature_dims)}; "
                "use fusion=concat, sum or mlp for other counts."
            )
        self.cond = condition or self.modalities[0]
        if self.cond not in feature_dims:
            raise ValueError(f"fusion.condition={self.cond!r} is not one of the modalities {self.modalities}")
        self.target = next(m for m in self.modalities if m != self.cond)
        self.level = FusionLevel(level)
        if self.level is FusionLevel.logit:
            self.branch = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in feature_dims.items()})
        else:
            self.natural_estimator = "zero_out"

    def natural_unimodal(self, feats):
        if self.level is FusionLevel.feature:
            return self.zero_out_unimodal(feats)
        return {m: self.branch[m](feats[m]) for m in self.modalities}


@configurable("fusion", runtime=("feature_dims", "num_classes"))
class FiLMFusion(_TwoModalityHead):
    """FiLM, conditioned on modality c (``condition``), of the target t.

    ``level=logit`` (default): f = γ(φ_c) ⊙ z_t + z_c, the branch logits z_t = W_t φ_t + b_t scaled feature-wise
    (γ = 1 + W_γ φ_c) plus the conditioning branch z_c. Uni-modal: the branches z_c, z_t.
    ``level=feature`` (the CVPR 2022 release): γ, β = split(W φ_c + b) with W: d_c -> 2 d_t, f = W_out (γ ⊙ φ_t + β)
    + b_out. Uni-modal: zero-out.
    """

    def __init__(
        self,
        feature_dims: Dict[str, int],
        num_classes: int,
        condition: Optional[str] = None,
        level: FusionLevel = FusionLevel.logit,
    ):
        super().__init__(feature_dims, num_classes, condition, level)
        if self.level is FusionLevel.logit:
            self.gamma = nn.Linear(feature_dims[self.cond], num_classes)
            init_weights(self)
            nn.init.zeros_(self.gamma.weight)  # start as plain sum fusion
        else:
            d_t = feature_dims[self.target]
            self.film = nn.Linear(feature_dims[self.cond], 2 * d_t)
            self.out = nn.Linear(d_t, num_classes)
            init_weights(self)

    def forward(self, feats):
        if self.level is FusionLevel.feature:
            gamma, beta = self.film(feats[self.cond]).chunk(2, dim=1)
            return self.out(gamma * feats[self.target] + beta)
        z_c, z_t = self.branch[self.cond](feats[self.cond]), self.branch[self.target](feats[self.target])
        return (1 + self.gamma(feats[self.cond])) * z_t + z_c


@configurable("fusion", runtime=("feature_dims", "num_classes"))
class GatedFusion(_TwoModalityHead):
    """Gated fusion, the conditioning modality c (``condition``) gating the target t.

    ``level=logit`` (default): f = W_o (σ(z_c) ⊙ z_t) + b_o on the branch logits. Uni-modal: the branches.
    ``level=feature`` (the CVPR 2022 release): u_m = W_m φ_m + b_m (width ``hidden``, null: the target's feature
    width), f = W_out (σ(u_c) ⊙ u_t) + b_out. Uni-modal: zero-out.
    """

    def __init__(
        self,
        feature_dims: Dict[str, int],
        num_classes: int,
        condition: Optional[str] = None,
        level: FusionLevel = FusionLevel.logit,
        hidden: Optional[PositiveInt] = None,
    ):
        super().__init__(feature_dims, num_classes, condition, level)
        if self.level is FusionLevel.logit:
            self.out = nn.Linear(num_classes, num_classes)
        else:
            width = hidden or feature_dims[self.target]
            self.proj = nn.ModuleDict({m: nn.Linear(d, width) for m, d in feature_dims.items()})
            self.out = nn.Linear(width, num_classes)
        init_weights(self)

    def forward(self, feats):
        if self.level is FusionLevel.feature:
            gate = torch.sigmoid(self.proj[self.cond](feats[self.cond]))
            return self.out(gate * self.proj[self.target](feats[self.target]))
        gate = torch.sigmoid(self.branch[self.cond](feats[self.cond]))
        return self.out(gate * self.branch[self.target](feats[self.target]))


@configurable("fusion", runtime=("feature_dims", "num_classes"))
class MLPFusion(FusionHead):
    """Concatenation followed by a hidden layer. No closed-form uni-modal logits: zero-out only."""

    natural_estimator = None

    def __init__(
        self, feature_dims: Dict[str, int], num_classes: int, hidden: PositiveInt = 128, dropout: DropoutRate = 0.0
    ):
        super().__init__(feature_dims, num_classes)
        self.net = nn.Sequential(
            nn.Linear(sum(feature_dims.values()), hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        init_weights(self)

    def forward(self, feats):
        return self.net(torch.cat([feats[m] for m in self.modalities], dim=1))


class AnswerForm(str, enum.Enum):
    choices = "choices"  # score each given answer choice (AVQA of Yang et al.: 4-way multiple choice)
    vocabulary = "vocabulary"  # classify over the answer vocabulary (MUSIC-AVQA)


@configurable("fusion", runtime=("feature_dims", "num_classes", "context_dims"))
class QuestionConditionedFusion(FusionHead):
    """Audio-visual question answering: the question decides how much each modality counts, then the answer is
    scored.

    Each modality m is projected, h_m = tanh(W_m φ_m); the question vector q (row 0 of the ``question``
    context [B, 1 + C, D]) gives g = W_q q and attention weights α_m = softmax_m(g·h_m / √H); the joint vector is
    j = ReLU(W_j [Σ_m α_m h_m ⊙ g; g]). With answer choices (rows 1..C of the context) the logits are the
    bilinear scores j·(W_c c_k) + b_c (``answer=choices``: C-way multiple choice, AVQA of Yang et al.); or a
    linear classifier over ``num_classes`` answers (``answer=vocabulary``: MUSIC-AVQA). Uni-modal logits:
    zero-out (the question is kept).
    """

    def __init__(
        self,
        feature_dims: Dict[str, int],
        num_classes: int,
        context_dims: Dict[str, int],
        answer: AnswerForm = AnswerForm.choices,
        hidden: PositiveInt = 256,
        question: str = "question",
        dropout: DropoutRate = 0.1,
    ):
        super().__init__(feature_dims, num_classes)
        if question not in context_dims:
            raise ValueError(f"fusion=qa reads the context input {question!r}; the dataset gives {list(context_dims)}")
        self.question = question
        dq = context_dims[question]
        self.proj = nn.ModuleDict({m: nn.Linear(d, hidden) for m, d in feature_dims.items()})
        self.query = nn.Linear(dq, hidden)
        self.joint = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.answer = AnswerForm(answer)
        if self.answer is AnswerForm.choices:
            self.choice = nn.Linear(dq, hidden)
            self.choice_bias = nn.Parameter(torch.zeros(()))
        else:
            self.classifier = nn.Linear(hidden, num_classes)
        self.scale = hidden**-0.5
        init_weights(self)

    def forward(self, feats):
        context = feats[self.question]
        g = self.query(context[:, 0])
        h = torch.stack([torch.tanh(self.proj[m](feats[m])) for m in self.modalities], dim=1)  # [B, M, H]
        alpha = torch.softmax((h * g[:, None]).sum(-1) * self.scale, dim=1)
        fused = (alpha[..., None] * h).sum(1)
        j = self.joint(torch.cat([fused * g, g], dim=1))
        if self.answer is AnswerForm.vocabulary:
            return self.classifier(j)
        if context.shape[1] < 2:
            raise ValueError(
                "fusion.answer=choices scores answer choices, but the questions came without any; "
                "use fusion=qa_vocabulary (MUSIC-AVQA)"
            )
        return (self.choice(context[:, 1:]) * j[:, None]).sum(-1) + self.choice_bias
