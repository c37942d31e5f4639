"""InfoReg, information acquisition regulation (Huang et al., CVPR 2025), as the authors' Nov 2025 code does it
(docs/method.md, "Zoo methods, part 1b").

Loss L = L_mm + Σ_m CE(z_m) (uni-modal logits from the head's own estimator: the W-slice of a concat head, as
the code). While the prime learning window is open, the modality that leads on the batch score
S_m = Σ_i softmax(z_m)_i[y_i] has its encoder pulled back towards its weights at the start of the epoch: its
gradient gets + β(θ - θ⁰), the gradient of (β/2)‖θ - θ⁰‖², with β = c_m·exp(tanh(S_lead - S_next)).

The window is read from a Fisher-information trace: T_m(e) = Σ_tensors mean over the tensor of Σ_steps g²
(the edited gradients of encoder m's weight matrices and kernels, epoch e). With the history padded by W zeros,
k(e) = (T(e-1) - T(e-1-W)) / Σ_{j=e-W}^{e-1} T(j) (k = 1 at the first epoch); the window is open while k > τ.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from onthefly.config import Estimator, NonNegativeFloat, PositiveInt, configurable
from onthefly.modulation.base import Modulation, StepContext


def window_indicator(traces: list[float], window: int = 10) -> float:
    """k from the per-epoch traces of the epochs done so far (1 before the first is done; 0 if all are zero)."""
    if not traces:
        return 1.0
    padded = [0.0] * window + list(traces)
    total = sum(padded[-window:])
    return (padded[-1] - padded[-window - 1]) / total if total > 0 else 0.0


def regulation_coefficients(scores: torch.Tensor, coef: torch.Tensor, window_open: bool) -> torch.Tensor:
    """β [M]: c_lead·exp(tanh(S_lead - S_next)) for the modality with the highest score, 0 for the others (and for
    everyone when the window is closed or the top two scores tie). No host sync."""
    if not window_open or scores.numel() < 2:
        return torch.zeros_like(scores)
    top, idx = scores.topk(2)
    gap = top[0] - top[1]
    lead = torch.where(gap > 0, coef[idx[0]] * torch.exp(torch.tanh(gap)), torch.zeros_like(gap))
    return torch.zeros_like(scores).scatter(0, idx[:1], lead.view(1))


def fisher_trace(sq_sums: torch.Tensor, numels: torch.Tensor) -> float:
    """Σ over tensors of the mean of their accumulated squared gradients."""
    return float((sq_sums / numels).sum())


@configurable("modulation")
class InfoReg(Modulation):
    """Proximal pull of the leading modality's encoder towards its epoch-start weights, in the prime window."""

    needs_rho = True  # reads the loop's batch scores S_m (summed over ranks, so every rank agrees)

    def __init__(
        self,
        coef: list[NonNegativeFloat] = [0.95, 0.1],  # noqa: B006 (copied below; the schema reads this default)
        tau: float = 0.05,
        trace_window: PositiveInt = 10,
        window_modality: str = "first",
        unimodal_loss: bool = True,
    ):
        self.coef, self.tau, self.trace_window = [float(c) for c in coef], float(tau), int(trace_window)
        self.window_modality, self.unimodal_loss = window_modality, bool(unimodal_loss)
        self.params: dict[str, list[torch.nn.Parameter]] = {}
        self.weights: dict[str, list[int]] = {}  # per modality: positions (in params) of the Fisher tensors
        self.snapshot: dict[str, list[torch.Tensor]] = {}
        self.traces: dict[str, list[float]] = {}  # per modality, one trace per finished epoch
        self.sq_sums: dict[str, torch.Tensor] = {}  # this epoch's Σ_steps ‖g‖² per Fisher tensor
        self.score_sums: Optional[torch.Tensor] = None  # this epoch's Σ_steps S_m (for window_modality=dominant)
        self.last_mean_scores: Optional[list[float]] = None
        self.k, self.window_open, self.trace_of, self.steps = 1.0, True, None, 0
        self._cached: Optional[dict] = None

    def setup(self, model, num_classes: int) -> None:
        mods = model.modalities
        if len(self.coef) != len(mods):
            raise ValueError(
                f"modulation.coef has {len(self.coef)} values but the model has {len(mods)} modalities "
                f"{mods}: give one per modality, in that order (the official [0.95, 0.1] is for "
                "[audio, visual])"
            )
        if self.window_modality not in ("first", "dominant", *mods):
            raise ValueError(
                f"modulation.window_modality={self.window_modality!r}: expected first, dominant or one of {mods}"
            )
        if model.head.num_classes < 2:
            raise ValueError("modulation=inforeg needs a classification head (task=classification)")
        self.params = {m: [p for p in enc.parameters() if p.requires_grad] for m, enc in model.encoders.items()}
        # Fisher tensors: the weights of convolutions and linear maps, i.e. the encoder tensors with >= 2 dims
        self.weights = {m: [i for i, p in enumerate(ps) if p.dim() >= 2] for m, ps in self.params.items()}
        self.traces = {m: [] for m in mods}

    def _trace_modality(self, mods: list[str]) -> str:
        if self.window_modality == "first":
            return mods[0]
        if self.window_modality == "dominant":
            if self.last_mean_scores is None:
                return mods[0]
            return mods[max(range(len(mods)), key=lambda i: self.last_mean_scores[i])]
        return self.window_modality

    def epoch_start(self, ctx: StepContext) -> None:
        self.snapshot = {m: [p.detach().clone() for p in ps] for m, ps in self.params.items()}
        self.trace_of = self._trace_modality(ctx.modalities)
        self.k = window_indicator(self.traces[self.trace_of], self.trace_window)
        self.window_open = self.k > self.tau
        self.sq_sums = {m: torch.zeros(len(self.weights[m]), device=ctx.device) for m in self.params}
        self.score_sums, self.steps, self._cached = torch.zeros(len(ctx.modalities), device=ctx.device), 0, None

    def after_forward(self, ctx: StepContext) -> None:
        if not self.unimodal_loss:
            return
        head = ctx.model.head
        estimator = Estimator.natural if head.natural_estimator else Estimator.zero_out
        for m, z in head.unimodal_logits(ctx.features, estimator).items():
            ctx.extra_losses[f"inforeg_uni_{m}"] = F.cross_entropy(z, ctx.labels)

    def _constants(self, ctx: StepContext) -> dict:
        """This epoch's per-step constants as device tensors (made once an epoch, not once a step)."""
        if self._cached is None:
            device = ctx.device
            self._cached = {
                "coef": torch.tensor(self.coef, device=device),
                "trace": torch.tensor(
                    [self.traces[m][-1] if self.traces[m] else 0.0 for m in ctx.modalities], device=device
                ),
                "k": torch.tensor(self.k, device=device),
                "open": torch.tensor(float(self.window_open), device=device),
            }
        return self._cached

    @torch.no_grad()
    def after_backward(self, ctx: StepContext) -> None:
        const = self._constants(ctx)
        scores = ctx.scores.float()
        beta = regulation_coefficients(scores, const["coef"], self.window_open)
        dists = []
        for i, m in enumerate(ctx.modalities):
            params = self.params[m]
            diffs = torch._foreach_sub(params, self.snapshot[m]) if params else []
            dists.append(torch.stack(torch._foreach_norm(diffs)).norm() if diffs else scores.new_zeros(()))
            edited = [(p.grad, d) for p, d in zip(params, diffs) if p.grad is not None]
            if edited and self.window_open:  # the gradient of (β/2)‖θ - θ⁰‖²
                grads = [g for g, _ in edited]
                torch._foreach_add_(grads, torch._foreach_mul([d for _, d in edited], beta[i].to(grads[0].dtype)))
            fisher = [
                params[j].grad if params[j].grad is not None else torch.zeros_like(params[j]) for j in self.weights[m]
            ]
            if fisher:  # a step whose gradients overflowed (fp16: the scaler skips it) adds nothing
                norms = torch.stack(torch._foreach_norm(fisher)).float().square()
                self.sq_sums[m] += torch.where(torch.isfinite(norms), norms, torch.zeros_like(norms))
        self.score_sums += scores
        self.steps += 1
        ctx.log_per_modality("inforeg_beta", beta)
        ctx.log_per_modality("inforeg_score", scores)
        ctx.log_per_modality("inforeg_dist", torch.stack(dists))
        ctx.log_per_modality("inforeg_trace", const["trace"])  # the trace of the last finished epoch
        ctx.metrics["inforeg_k"] = const["k"]
        ctx.metrics["inforeg_open"] = const["open"]

    def epoch_end(self, ctx: StepContext) -> None:
        for m, ps in self.params.items():
            numels = torch.tensor([float(ps[j].numel()) for j in self.weights[m]], device=self.sq_sums[m].device)
            self.traces[m].append(fisher_trace(self.sq_sums[m], numels) if len(numels) else 0.0)
        self.last_mean_scores = (self.score_sums / max(self.steps, 1)).tolist()

    def state_dict(self) -> dict:
        return {
            "snapshot": self.snapshot,
            "traces": self.traces,
            "sq_sums": self.sq_sums,
            "score_sums": self.score_sums,
            "steps": self.steps,
            "last_mean_scores": self.last_mean_scores,
            "k": self.k,
            "window_open": self.window_open,
            "trace_of": self.trace_of,
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.snapshot, self.traces, self.sq_sums = state["snapshot"], state["traces"], state["sq_sums"]
        self.score_sums, self.steps = state["score_sums"], state["steps"]
        self.last_mean_scores, self.k = state["last_mean_scores"], state["k"]
        self.window_open, self.trace_of, self._cached = state["window_open"], state["trace_of"], None
        device = next(iter(self.params.values()))[0].device if self.params else torch.device("cpu")
        self.sq_sums = {m: t.to(device) for m, t in self.sq_sums.items()}
        if self.score_sums is not None:
            self.score_sums = self.score_sums.to(device)
        self.snapshot = {m: [t.to(device) for t in ts] for m, ts in self.snapshot.items()}
