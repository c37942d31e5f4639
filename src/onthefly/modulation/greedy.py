"""The greedy learner's balancing (Wu, Jastrzębski, Cho, Geras, ICML 2022) on an MMTM model (docs/method.md §10.5).

Conditional learning speed: per regular step, for each branch m, μ(G) = Σ_{p∈G} ‖∂L/∂p‖² / Σ_{p∈G} ‖p‖² over two
parameter groups, main_m (encoder m and branch m's classifier) and bypass_m (m's excitation layers and the shared
squeeze layers of every MMTM); both are summed from step 0 (curation steps excepted) into S_main,m and S_byp,m, and
BDR_m = log10(S_byp,m / S_main,m), d_BDR = BDR_0 − BDR_1.

Guided re-balancing: once unlocked (epoch ≥ ``starting_epoch``), a regular step with |d_BDR| > ε starts ``window``
curation steps for the caring branch c (0 if d_BDR > 0, else 1): every MMTM gates branch c with its running-average
gate Ē_c (``ctx.curation``), so c learns without sample-specific help from the other modality. Random variant: once
unlocked, each step is regular, curates branch 0 or curates branch 1 with probability 1/3 each.
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F

from onthefly.config import ConfigError, NonNegativeFloat, NonNegativeInt, PositiveInt, configurable
from onthefly.modulation.base import Modulation, StepContext


class Variant(str, enum.Enum):
    guided = "guided"  # curate when the conditional learning speeds differ by more than epsilon
    random = "random"  # curate a random branch (or none) each step


class BranchLoss(str, enum.Enum):
    branch_sum = "branch_sum"  # Σ_m CE(ŷ_m, y) on each branch's own logits (the released code)
    fused = "fused"  # CE on the fused logits (BalanceBenchmark)


class GateAverage(str, enum.Enum):
    train = "train"  # Ē is the mean gate over training forwards
    all = "all"  # also over evaluation forwards (the released code)


def learning_speed(params: list[torch.Tensor]) -> torch.Tensor:
    """μ = Σ ‖g_p‖² / Σ ‖p‖² over ``params`` (a parameter without a gradient counts as g = 0); no host sync."""
    weights = torch.stack(torch._foreach_norm([p.detach() for p in params])).float().pow(2).sum()
    grads = [p.grad for p in params if p.grad is not None]
    g = torch.stack(torch._foreach_norm(grads)).float().pow(2).sum() if grads else weights.new_zeros(())
    return g / weights.clamp_min(1e-30)


def balance_difference(main: torch.Tensor, bypass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(BDR per branch = log10(S_byp / S_main), d_BDR = BDR_0 − BDR_1) from the summed speeds [2]."""
    bdr = torch.log10(bypass.clamp_min(1e-30) / main.clamp_min(1e-30))
    return bdr, bdr[0] - bdr[1]


@configurable("modulation")
class Greedy(Modulation):
    """Guided (or random) re-balancing of an MMTM model (see the module docstring)."""

    def __init__(
        self,
        variant: Variant = Variant.guided,
        epsilon: NonNegativeFloat = 0.01,
        window: PositiveInt = 5,
        starting_epoch: NonNegativeInt = 2,
        loss: BranchLoss = BranchLoss.branch_sum,
        gate_average: GateAverage = GateAverage.train,
        gate_bug: bool = False,
    ):
        self.variant, self.epsilon, self.window = Variant(variant), float(epsilon), int(window)
        self.starting_epoch, self.loss = int(starting_epoch), BranchLoss(loss)
        self.gate_average, self.gate_bug = GateAverage(gate_average), bool(gate_bug)
        if self.window < 1:
            raise ConfigError(f"modulation.window must be >= 1 (curation steps per decision), got {window}")
        self.modalities: list[str] = []
        self.main: list[list[torch.nn.Parameter]] = []
        self.bypass: list[list[torch.nn.Parameter]] = []
        # state (checkpointed)
        self.speed_sums = torch.zeros(2, 2, dtype=torch.float64)  # [main | bypass, branch]
        self.unlocked = False
        self.caring = None  # index of the curated branch while curating
        self.left = 0  # curation steps left
        self.bdr = torch.zeros(2)
        self.d_bdr = torch.zeros(())

    def setup(self, model, num_classes: int) -> None:
        interaction = getattr(model, "interaction", None)
        if not getattr(interaction, "supports_curation", False):
            raise ConfigError(
                "modulation=greedy re-balances through MMTM's per-branch gates (its conditional learning speed reads "
                "the MMTM parameters, and its curation steps replace a branch's gates), but this model has "
                f"{'no interaction module' if interaction is None else type(interaction).__name__}; use fusion=mmtm."
            )
        if len(model.modalities) != 2:
            raise ConfigError(f"modulation=greedy balances two branches; the model has {model.modalities}")
        if self.loss is BranchLoss.branch_sum and getattr(model.head, "natural_estimator", None) is None:
            raise ConfigError("modulation.loss=branch_sum needs the head's branch logits (fusion.head late_avg or sum)")
        interaction.average_gates_in_eval = self.gate_average is GateAverage.all
        interaction.gate_average_bug = self.gate_bug
        self.modalities = list(model.modalities)
        shared = [p for p in interaction.shared_parameters() if p.requires_grad]
        self.main = [
            [p for p in [*model.encoders[m].parameters(), *model.head.modality_parameters(m)] if p.requires_grad]
            for m in self.modalities
        ]
        self.bypass = [
            [p for p in interaction.modality_parameters(m) if p.requires_grad] + shared for m in self.modalities
        ]

    def epoch_start(self, ctx: StepContext) -> None:
        if ctx.epoch >= self.starting_epoch:
            self.unlocked = True

    def before_forward(self, ctx: StepContext) -> None:
        curating = self.left > 0
        ctx.curation = self.modalities[self.caring] if curating else None
        one = torch.ones((), device=ctx.device)
        ctx.metrics["greedy_curating"] = one * curating
        for i, m in enumerate(self.modalities):
            ctx.metrics[f"greedy_curate_{m}"] = one * (curating and self.caring == i)

    def after_forward(self, ctx: StepContext) -> None:
        if self.loss is BranchLoss.branch_sum:
            ctx.loss_weight = 0.0
            for m, logits in ctx.model.head.natural_unimodal(ctx.features).items():
                ctx.extra_losses[f"greedy_branch_{m}"] = F.cross_entropy(logits, ctx.labels)

    def after_backward(self, ctx: StepContext) -> None:
        """Decide whether the next step(s) curate (after the backward, as the released code does)."""
        if self.variant is Variant.random:
            self.left = 0
            if self.unlocked:  # the next step is regular, or curates branch 0, or branch 1
                mode = int(torch.randint(3, ()))
                if mode:
                    self.caring, self.left = mode - 1, 1
            return
        if self.left > 0:  # this step curated: no speed is measured
            self.left -= 1
        else:
            speeds = torch.stack(
                [
                    torch.stack([learning_speed(g) for g in self.main]),
                    torch.stack([learning_speed(g) for g in self.bypass]),
                ]
            )
            self.speed_sums = self.speed_sums.to(speeds.device) + speeds.double()
            bdr, d = balance_difference(self.speed_sums[0], self.speed_sums[1])
            self.bdr, self.d_bdr = bdr.float(), d.float()
            if self.unlocked:
                d_value = float(d)  # the method's one host sync per regular step
                if abs(d_value) > self.epsilon:
                    self.caring, self.left = (0 if d_value > 0 else 1), self.window
        ctx.log_per_modality("greedy_bdr", self.bdr.to(ctx.device))
        ctx.metrics["greedy_d_bdr"] = self.d_bdr.to(ctx.device)

    def state_dict(self) -> dict:
        return {
            "speed_sums": self.speed_sums.cpu(),
            "unlocked": self.unlocked,
            "caring": self.caring,
            "left": self.left,
            "bdr": self.bdr.cpu(),
            "d_bdr": self.d_bdr.cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.speed_sums = state.get("speed_sums", self.speed_sums)
        self.unlocked, self.caring, self.left = state.get("unlocked", False), state.get("caring"), state.get("left", 0)
        self.bdr, self.d_bdr = state.get("bdr", self.bdr), state.get("d_bdr", self.d_bdr)
