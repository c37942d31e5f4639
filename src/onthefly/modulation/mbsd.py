"""MBSD as BalanceBenchmark implements it (after Liu et al., WSDM 2023: self-distillation from the dominant
modality to the weaker one); no code of the authors was found (docs/method.md, "Zoo methods, part 1b").

With uni-modal logits z_m, p_m = softmax(z_m), q_m,i = p_m,i[y_i], for a pair of modalities (a, b):
    w_i  = |q_a,i - q_b,i| where either modality predicts y_i, else 0
    RS_i = (1/K)‖z_a,i - z_b,i‖² (two modalities; on probabilities p for three or more, as the benchmark)
and the loss adds Σ_m CE(z_m) + mean_i w_i·RS_i + mean_i w_i·KD_i inside the epoch window (outside it: the fused CE
alone), the pair terms averaged over all pairs.

Variants (the distillation term KD):
    balancebenchmark   the benchmark's term, kept as it is: F.kl_div(input=ps, target=pw) on the scalars
                       ps = max(q_a, q_b), pw = min(q_a, q_b), i.e. pw·(log pw - ps) (not a KL divergence), with
                       gradients through w, ps and pw
    corrected          w detached; KD_i = KL(sg(p_strong,i) ‖ p_weak,i) over the classes, the teacher being the
                       modality with the larger q_i (self-distillation from the stronger modality)
"""

from __future__ import annotations

import enum
import itertools
from typing import Optional

import torch
import torch.nn.functional as F

from onthefly.config import Estimator, NonNegativeInt, configurable
from onthefly.modulation.base import EpochWindow, Modulation, StepContext


class MBSDVariant(str, enum.Enum):
    balancebenchmark = "balancebenchmark"
    corrected = "corrected"


def pair_terms(
    za: torch.Tensor,
    zb: torch.Tensor,
    labels: torch.Tensor,
    rs_on_probs: bool,
    variant: MBSDVariant | str = MBSDVariant.balancebenchmark,
) -> dict:
    """Per-sample w, RS, KD of one modality pair, and the teacher mask (True where a is the stronger)."""
    la, lb = F.log_softmax(za.float(), 1), F.log_softmax(zb.float(), 1)
    idx = labels.view(-1, 1)
    lqa, lqb = la.gather(1, idx).squeeze(1), lb.gather(1, idx).squeeze(1)
    qa, qb = lqa.exp(), lqb.exp()
    either = (la.argmax(1) == labels) | (lb.argmax(1) == labels)
    a_strong = qa >= qb
    w = torch.where(either, (qa - qb).abs(), torch.zeros_like(qa))
    if rs_on_probs:
        rs = (la.exp() - lb.exp()).square().mean(1)
    else:
        rs = (za.float() - zb.float()).square().mean(1)
    if MBSDVariant(variant) is MBSDVariant.balancebenchmark:
        ps = torch.where(a_strong, qa, qb)
        log_pw = torch.where(a_strong, lqb, lqa)
        kd = log_pw.exp() * (log_pw - ps)  # F.kl_div(ps, pw) = pw·(log pw - ps), finite where pw underflows
    else:
        w = w.detach()
        log_strong = torch.where(a_strong.unsqueeze(1), la, lb).detach()
        log_weak = torch.where(a_strong.unsqueeze(1), lb, la)
        kd = (log_strong.exp() * (log_strong - log_weak)).sum(1)
    return {"w": w, "rs": rs, "kd": kd, "a_strong": a_strong}


@configurable("modulation")
class MBSD(Modulation):
    """Uni-modal CE + w-weighted logit similarity + distillation between modality pairs, in the epoch window."""

    def __init__(
        self,
        variant: MBSDVariant = MBSDVariant.balancebenchmark,
        start: NonNegativeInt = 0,
        end: Optional[NonNegativeInt] = 80,
    ):
        self.variant = MBSDVariant(variant)
        self.window = EpochWindow(start, end)

    def setup(self, model, num_classes: int) -> None:
        if model.head.num_classes < 2:
            raise ValueError("modulation=mbsd needs a classification head (task=classification)")
        if len(model.modalities) < 2:
            raise ValueError("modulation=mbsd distils between modalities: the model needs at least two")

    def after_forward(self, ctx: StepContext) -> None:
        if ctx.epoch not in self.window:
            return
        head, mods, labels = ctx.model.head, ctx.modalities, ctx.labels
        estimator = Estimator.natural if head.natural_estimator else Estimator.zero_out
        z = head.unimodal_logits(ctx.features, estimator)
        ce = torch.stack([F.cross_entropy(z[m], labels) for m in mods])
        pairs = list(itertools.combinations(range(len(mods)), 2))
        terms = [pair_terms(z[mods[i]], z[mods[j]], labels, len(mods) > 2, self.variant) for i, j in pairs]
        rs = torch.stack([(t["w"] * t["rs"]).mean() for t in terms]).mean()
        kd = torch.stack([(t["w"] * t["kd"]).mean() for t in terms]).mean()
        for m, loss in zip(mods, ce.unbind(0)):
            ctx.extra_losses[f"mbsd_uni_{m}"] = loss
        ctx.extra_losses["mbsd_rs"] = rs
        ctx.extra_losses["mbsd_kd"] = kd
        # teacher share: per modality, the share of (sample, pair) slots where it is the stronger of its pair
        teacher = torch.zeros(len(mods), device=labels.device)
        for (i, j), t in zip(pairs, terms):
            strong = t["a_strong"].float().mean()
            teacher[i] += strong / (len(mods) - 1)
            teacher[j] += (1 - strong) / (len(mods) - 1)
        ctx.log_per_modality("mbsd_ce", ce)
        ctx.log_per_modality("mbsd_teacher", teacher)
        w = torch.stack([t["w"] for t in terms]).detach()
        ctx.metrics["mbsd_w"] = w.mean()
        ctx.metrics["mbsd_active"] = (w > 0).float().mean()
        ctx.metrics["mbsd_rs"] = rs.detach()
        ctx.metrics["mbsd_kd"] = kd.detach()
