"""The method zoo, part 1a (docs/method.md, "Zoo methods, part 1a"): PMR, AGM, MMPareto, MMCosine, UMT, UME.

Each method's arithmetic is checked on small fixed tensors against values worked by hand (or an independent
formula written here), then each runs once end to end on the tiny synthetic benchmark, every `variant` included.
"""

from __future__ import annotations

import itertools
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from test_methods import AV, mlp_model
from test_methods import assert_close as close
from torch import nn

from onthefly.models import MultimodalModel
from onthefly.models.encoders import MLPEncoder
from onthefly.models.fusion import ConcatFusion, FiLMFusion
from onthefly.modulation.agm import (
    AGM,
    agm_coefficients,
    agm_ratios,
    agm_scores,
    clip_if_large,
    coalitions,
    shapley_logits,
)
from onthefly.modulation.base import StepContext
from onthefly.modulation.mmcosine import CosineHead, MMCosine, cosine_logits, supervised_nce
from onthefly.modulation.mmpareto import MMPareto, pareto_gradients, pareto_weights
from onthefly.modulation.pmr import PMR, class_means, pmr_coefficients, prototype_logits, prototype_scores
from onthefly.modulation.umt import UME, UMT, EnsembleHead, distill_losses, load_teacher

from conftest import read_results

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def batch(b=6, dims=(5, 7), num_classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    inputs = {"audio": torch.randn(b, dims[0], generator=g), "visual": torch.randn(b, dims[1], generator=g)}
    return inputs, torch.arange(b) % num_classes


def step_ctx(model, inputs, labels, epoch=0, global_step=0) -> StepContext:
    """A context after the model's forward, as the trainer builds it (features, fused logits)."""
    ctx = StepContext(
        epoch=epoch,
        step=0,
        global_step=global_step,
        model=model,
        modalities=list(model.modalities),
        inputs=inputs,
        labels=labels,
    )
    ctx.features = model.encode(inputs)
    ctx.logits = model.head(ctx.features)
    return ctx


def total_loss(ctx: StepContext) -> torch.Tensor:
    """The trainer's loss: loss_weight · fused CE + the extra losses."""
    return ctx.loss_weight * F.cross_entropy(ctx.logits, ctx.labels) + sum(ctx.extra_losses.values())


def steps_of(out_dir) -> pd.DataFrame:
    return pd.read_csv(out_dir / "steps.csv")


# --- PMR -------------------------------------------------------------------------------------------------------
def test_pmr_prototype_logits_are_negative_euclidean_distances():
    feats = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    protos = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    close(prototype_logits(feats, protos), [[0.0, -3.0], [-5.0, -4.0]])


def test_pmr_prototype_loss_has_a_finite_gradient_where_a_feature_sits_on_its_prototype():
    feats = torch.tensor([[1.0, 2.0], [0.5, -1.0]], requires_grad=True)
    protos = torch.tensor([[1.0, 2.0], [0.0, 0.0]])  # sample 0 sits exactly on prototype 0
    F.cross_entropy(prototype_logits(feats, protos), torch.tensor([0, 1])).backward()
    assert torch.isfinite(feats.grad).all()


def test_pmr_scores_are_batch_sums_of_true_class_softmax():
    # audio rows: softmax([0, 0]) = [1/2, 1/2], softmax([log 3, 0]) = [3/4, 1/4]; labels [0, 1] -> 1/2 + 1/4
    logits = {
        "audio": torch.tensor([[0.0, 0.0], [math.log(3), 0.0]]),
        "visual": torch.tensor([[math.log(4), 0.0], [0.0, 0.0]]),
    }  # 4/5 + 1/2
    close(prototype_scores(logits, torch.tensor([0, 1])), [0.75, 1.3])


@pytest.mark.parametrize(
    "scores,expected",
    [
        ([2.0, 1.0], [0.0, 2.5]),  # ρ = S_a/S_v > 1: visual is pushed
        ([1.0, 2.0], [2.5, 0.0]),  # ρ < 1: audio
        ([1.5, 1.5], [0.0, 0.0]),  # ρ = 1: neither
        ([3.0, 1.0, 2.0], [0.0, 2.5, 2.5]),  # three modalities: every one below the best
    ],
)
def test_pmr_coefficients_push_only_the_lagging_modality(scores, expected):
    close(pmr_coefficients(torch.tensor(scores), 2.5), expected)


def test_pmr_class_means_keep_the_previous_prototype_of_an_absent_class():
    sums, counts = torch.tensor([[4.0, 2.0], [0.0, 0.0], [3.0, 3.0]]), torch.tensor([2.0, 0.0, 3.0])
    previous = torch.tensor([[9.0, 9.0], [7.0, 8.0], [9.0, 9.0]])
    close(class_means(sums, counts, previous), [[2.0, 1.0], [7.0, 8.0], [1.0, 1.0]])
    close(class_means(sums, counts, None), [[2.0, 1.0], [0.0, 0.0], [1.0, 1.0]])  # never 0/0


class Passthrough(nn.Module):
    """An encoder that returns its input and records the mode it ran in."""

    def __init__(self, dim):
        super().__init__()
        self.out_dim, self.modes = dim, []
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.modes.append(self.training)
        return x + 0 * self.w


def test_pmr_prototype_pass_reads_a_tenth_of_the_batches_in_eval_mode_and_blends_from_epoch_two():
    model = MultimodalModel(
        {"audio": Passthrough(2), "visual": Passthrough(1)}, ConcatFusion({"audio": 2, "visual": 1}, 3)
    )
    model.train()
    batches = [
        (
            {"audio": torch.tensor([[1.0, 0.0], [3.0, 2.0]]), "visual": torch.tensor([[1.0], [5.0]])},
            torch.tensor([0, 0]),
        ),
        (
            {"audio": torch.tensor([[0.0, 4.0], [9.0, 9.0]]), "visual": torch.tensor([[2.0], [9.0]])},
            torch.tensor([1, 2]),
        ),
        ({"audio": torch.tensor([[100.0, 100.0]]), "visual": torch.tensor([[100.0]])}, torch.tensor([2])),
    ]
    read = []

    def batches_fn(split, max_batches=None, with_index=False):
        read.append((split, max_batches))
        return iter(batches[:max_batches])

    pmr = PMR(momentum=0.5, proto_fraction=0.1)
    pmr.setup(model, 3)

    def ctx(epoch):
        return StepContext(
            epoch=epoch,
            step=0,
            global_step=0,
            model=model,
            modalities=AV,
            batches=batches_fn,
            num_batches=lambda split: 25,
        )

    pmr.epoch_start(ctx(0))  # ⌊25/10⌋ = 2 batches of train; class 2 appears once in them
    assert read == [("train", 2)]
    assert model.encoders["audio"].modes == [False, False] and model.training  # eval for the pass, then back
    close(pmr.prototypes["audio"], [[2.0, 1.0], [0.0, 4.0], [9.0, 9.0]])
    close(pmr.prototypes["visual"], [[3.0], [2.0], [9.0]])
    first = {m: c.clone() for m, c in pmr.prototypes.items()}
    batches[0] = (
        {"audio": torch.tensor([[5.0, 5.0], [5.0, 5.0]]), "visual": torch.tensor([[7.0], [7.0]])},
        torch.tensor([0, 0]),
    )
    pmr.epoch_start(ctx(1))  # the pass before epoch 1 is fresh (as released)
    close(pmr.prototypes["audio"][0], [5.0, 5.0])
    pmr.epoch_start(ctx(2))  # from epoch 2 on: (1 - μ)·new + μ·old, here new = old = [5, 5] for class 0
    close(pmr.prototypes["audio"][0], [5.0, 5.0])
    batches[0] = (
        {"audio": torch.tensor([[1.0, 1.0], [1.0, 1.0]]), "visual": torch.tensor([[1.0], [1.0]])},
        torch.tensor([0, 0]),
    )
    pmr.epoch_start(ctx(3))
    close(pmr.prototypes["audio"][0], [3.0, 3.0])  # 0.5·[1, 1] + 0.5·[5, 5]
    close(pmr.prototypes["audio"][1], first["audio"][1])  # unchanged class: blend of equal prototypes


def test_pmr_adds_the_prototype_loss_of_the_lagging_modality_only():
    model = mlp_model()
    inputs, labels = batch()
    pmr = PMR(alpha=2.0)
    pmr.setup(model, 3)
    with torch.no_grad():
        feats = model.encode(inputs)
    pmr.prototypes = {m: torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i, m in enumerate(AV)}
    ctx = step_ctx(model, inputs, labels)
    pmr.after_forward(ctx)
    logits = {m: -torch.cdist(feats[m], pmr.prototypes[m]) for m in AV}
    s = [torch.softmax(logits[m], 1)[torch.arange(6), labels].sum() for m in AV]
    lagging = AV[int(s[1] < s[0])]
    leading = next(m for m in AV if m != lagging)
    close(ctx.metrics[f"pmr_beta_{lagging}"], 2.0)
    close(ctx.metrics[f"pmr_beta_{leading}"], 0.0)
    close(ctx.extra_losses[f"pmr_pce_{lagging}"], 2.0 * F.cross_entropy(logits[lagging], labels))
    close(ctx.extra_losses[f"pmr_pce_{leading}"], 0.0)
    close(ctx.metrics["pmr_ratio_audio"], s[0] / s[1])


# --- AGM -------------------------------------------------------------------------------------------------------
def _random_coalitions(m, b=3, k=4):
    g = torch.Generator().manual_seed(m)
    return {
        frozenset(s): torch.randn(b, k, generator=g) for r in range(m + 1) for s in itertools.combinations(range(m), r)
    }


def test_agm_two_modality_shares_are_the_released_formula():
    f = _random_coalitions(2)
    z, z_a0, z_0v = f[frozenset({0, 1})], f[frozenset({0})], f[frozenset({1})]  # z_a0: visual zeroed
    m_a, m_v = shapley_logits(f, 2)
    close(m_a, 0.5 * (z - z_0v + z_a0))
    close(m_v, 0.5 * (z - z_a0 + z_0v))
    bb_a, bb_v = shapley_logits(f, 2, include_empty=False)  # the benchmark: no empty coalition
    close(bb_a, 0.5 * (z - z_0v))
    close(bb_v, 0.5 * (z - z_a0))


def test_agm_shares_are_shapley_values_over_orderings_and_sum_to_the_fused_logits():
    m = 3
    f = _random_coalitions(m)
    shares = shapley_logits(f, m)
    for i in range(m):  # independent formula: mean marginal contribution over all orderings, + f(∅)/M
        contributions = []
        for order in itertools.permutations(range(m)):
            before = frozenset(order[: order.index(i)])
            contributions.append(f[before | {i}] - f[before])
        close(shares[i], torch.stack(contributions).mean(0) + f[frozenset()] / m)
    close(sum(shares), f[frozenset(range(m))])
    assert len(coalitions(m)) == 2**m - 1


def test_agm_scores_are_mean_cross_entropies_floored_at_1e8():
    # audio: p(true) = 1/2 and 3/4 -> mean(-log) ; visual: row 1's true class has p ≈ e^-50 < 1e-8 -> -log 1e-8
    mono = [torch.tensor([[0.0, 0.0], [0.0, math.log(3)]]), torch.tensor([[0.0, 0.0], [50.0, 0.0]])]
    s = agm_scores(mono, torch.tensor([0, 1]))
    close(s, [(math.log(2) + math.log(4 / 3)) / 2, (math.log(2) - math.log(1e-8)) / 2])


def test_agm_coefficient_slows_the_leading_modality_official_and_boosts_it_in_the_benchmark():
    s = torch.tensor([0.5, 1.5])  # audio's loss is lower: audio leads
    targets = torch.tensor([1.0, 1.0])  # historically even: r̄ = 1
    r = agm_ratios(s)
    close(r, [math.exp(1.0), math.exp(-1.0)])  # r_a = exp(s_v - s_a)
    kappa = agm_coefficients(agm_ratios(targets), r, 0.5, 10.0)
    close(kappa, [math.exp(0.5 * (1 - math.e)), math.exp(0.5 * (1 - math.exp(-1)))])
    assert kappa[0] < 1 < kappa[1]
    bb = agm_coefficients(agm_ratios(targets, "balancebenchmark"), agm_ratios(s, "balancebenchmark"), 0.5, 7.0)
    close(bb, [math.exp(0.5 * (1 - math.exp(-1))), math.exp(0.5 * (1 - math.e))])
    assert bb[0] > 1 > bb[1]  # the flipped sign: the leading audio is sped up
    close(agm_coefficients(torch.tensor([30.0]), torch.tensor([0.0]), 1.0, 10.0), [math.exp(10.0)])  # the clamp


def test_agm_three_modality_ratio_uses_m_over_m_minus_one():
    s = torch.tensor([1.0, 2.0, 3.0])
    close(agm_ratios(s), torch.exp(1.5 * (2.0 - s)))


def test_agm_running_targets_are_cumulative_means_updated_after_the_coefficients():
    model = mlp_model()
    agm = AGM(alpha=1.0)
    agm.setup(model, 3)
    seen = []
    for n in range(3):
        inputs, labels = batch(seed=n)
        ctx = step_ctx(model, inputs, labels, global_step=n)
        agm.after_forward(ctx)
        seen.append(ctx.metrics["agm_score_audio"])
        if n == 0:
            close(ctx.metrics["agm_target_ratio_audio"], 1.0)  # T = 0 before the first step: r̄ = 1
    close(agm.targets[0], torch.stack(seen).mean())


def test_agm_cheap_passes_scale_encoders_and_head_blocks_and_leave_bn_statistics_alone():
    torch.manual_seed(0)
    encoders = {"audio": nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)), "visual": nn.Sequential(nn.Linear(7, 4))}
    for enc in encoders.values():
        enc.out_dim = 4
    model = MultimodalModel(encoders, ConcatFusion({"audio": 4, "visual": 4}, 3)).train()
    agm = AGM(alpha=1.0)
    agm.setup(model, 3)
    inputs, labels = batch()
    ctx = step_ctx(model, inputs, labels)
    bn = encoders["audio"][1]
    stats = (bn.running_mean.clone(), bn.num_batches_tracked.clone())
    agm.after_forward(ctx)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.num_batches_tracked, stats[1])
    assert model.training and encoders["audio"].training
    kappa = torch.stack([ctx.metrics["agm_kappa_audio"], ctx.metrics["agm_kappa_visual"]])
    model.zero_grad()
    F.cross_entropy(ctx.logits, labels).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    agm.after_backward(ctx)
    for name, p in model.named_parameters():
        if name.startswith("encoders.audio"):
            close(p.grad, kappa[0] * plain[name])
        elif name.startswith("encoders.visual"):
            close(p.grad, kappa[1] * plain[name])
    w = model.head.fc.weight.grad
    close(w[:, :4], kappa[0] * plain["head.fc.weight"][:, :4])
    close(w[:, 4:], kappa[1] * plain["head.fc.weight"][:, 4:])
    close(model.head.fc.bias.grad, kappa.mean() * plain["head.fc.bias"])


def test_agm_balancebenchmark_scales_only_matrix_tensors_of_the_encoders():
    model = mlp_model()
    agm = AGM(variant="balancebenchmark")
    agm.setup(model, 3)
    agm.kappa = torch.tensor([2.0, 0.5])
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.01)
    agm.after_backward(StepContext(epoch=0, step=0, global_step=0, model=model, modalities=AV))
    for name, p in model.named_parameters():
        scale = 1.0
        if name.startswith("encoders.") and p.dim() > 1:
            scale = 2.0 if ".audio." in name else 0.5
        close(p.grad, torch.full_like(p, 0.01 * scale))


def test_agm_clip_rule_clips_all_gradients_only_when_a_head_weight_gradient_is_large():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, 2))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([[0.5, 0.0], [0.0, 0.0]])
    assert clip_if_large([a, b], [b], 1.0, 1.0) == 0  # |∇W| ≤ 1: untouched
    close(a.grad, [3.0, 0.0])
    b.grad = torch.tensor([[4.0, 0.0], [0.0, 0.0]])
    assert clip_if_large([a, b], [b], 1.0, 1.0) == 1  # total norm 5 -> 1
    close(a.grad, [0.6, 0.0], atol=1e-5)
    close(b.grad, [[0.8, 0.0], [0.0, 0.0]], atol=1e-5)


def test_agm_exact_passes_with_unit_coefficients_give_the_plain_gradient():
    model = mlp_model()  # no BatchNorm or dropout: eval and train passes agree
    inputs, labels = batch()
    model.zero_grad()
    F.cross_entropy(model(inputs), labels).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    agm = AGM(alpha=0.0, passes="exact")
    agm.setup(model, 3)
    ctx = step_ctx(model, inputs, labels)
    agm.after_forward(ctx)
    model.zero_grad()
    total_loss(ctx).backward()
    for name, p in model.named_parameters():
        close(p.grad, plain[name], atol=1e-6)


def test_agm_refuses_a_uni_modal_model():
    model = MultimodalModel({"audio": MLPEncoder(5, 6, 4)}, ConcatFusion({"audio": 4}, 3))
    with pytest.raises(ValueError, match="modulation=none"):
        AGM().setup(model, 3)


# --- MMPareto --------------------------------------------------------------------------------------------------
def test_mmpareto_weights_are_even_for_a_positive_cosine():
    c1, cos = pareto_weights(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))
    close(cos, 1 / math.sqrt(2))
    close(c1, 0.5)


def test_mmpareto_weights_are_the_min_norm_point_for_a_negative_cosine():
    g_mm, g_u = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 2.0])
    c1, cos = pareto_weights(g_mm, g_u)
    close(cos, -1 / math.sqrt(5))
    close(c1, 0.75)  # (⟨u,u⟩ − ⟨mm,u⟩) / ‖mm − u‖² = (5 + 1) / 8
    grid = torch.linspace(0, 1, 10001)  # independent check: the grid minimum of ‖c g_mm + (1 − c) g_u‖
    norms = (grid[:, None] * g_mm + (1 - grid[:, None]) * g_u).norm(dim=1)
    close(c1, grid[norms.argmin()], atol=1e-3)


def test_mmpareto_rescale_lifts_each_tensor_to_the_summed_gradients_norm():
    # two one-entry tensors; g_mm = [1 | 0], g_u = [−1 | 2]; c1 = 3/4 -> n = [2·¾·1 + 2·¼·(−1) | 2·¼·2] = [1 | 1]
    g_mm, g_u = [torch.tensor([1.0]), torch.tensor([0.0])], [torch.tensor([-1.0]), torch.tensor([2.0])]
    total = [a + b for a, b in zip(g_mm, g_u)]  # [0 | 2]
    new, ratio = pareto_gradients(total, g_mm, g_u, torch.tensor(0.75), 1.5)
    close(ratio, [0.0, 2.0])  # t_P / ‖n_P‖
    close(torch.cat(new), [1.5 * 1.0, 1.5 * 2.0 * 1.0])  # ratio < 1 keeps n_P; ratio 2 doubles it; times γ
    same, _ = pareto_gradients(total, g_mm, g_u, torch.tensor(0.5), 1.5)  # agreeing: γ·(g_mm + g_u)
    close(torch.cat(same), 1.5 * torch.cat(total))


def _mmpareto_step(variant):
    torch.manual_seed(0)
    model = mlp_model()
    method = MMPareto(variant=variant)
    method.setup(model, 3)
    inputs, labels = batch()
    ctx = step_ctx(model, inputs, labels)
    method.after_forward(ctx)
    params = {m: list(model.encoders[m].parameters()) for m in AV}
    model.zero_grad()
    if method.aux is not None:
        method.aux.zero_grad()
    total_loss(ctx).backward()
    method.after_backward(ctx)
    return model, method, ctx, params, inputs, labels


def test_mmpareto_compares_two_different_gradients_per_encoder():
    """The benchmark's bug (a gradient compared with itself, so the Pareto step never runs) must not reappear:
    the two gradients are those of L_mm and of L_m, computed here independently."""
    torch.manual_seed(3)
    model = mlp_model()
    method = MMPareto()
    method.setup(model, 3)
    inputs, labels = batch()
    ctx = step_ctx(model, inputs, labels)
    method.after_forward(ctx)
    fused = F.cross_entropy(ctx.logits, labels)
    uni = {m: F.cross_entropy(method.aux[m](ctx.features[m]), labels) for m in AV}
    expected = {}
    for m in AV:
        params = list(model.encoders[m].parameters())
        g_mm = torch.cat([g.reshape(-1) for g in torch.autograd.grad(fused, params, retain_graph=True)])
        g_u = torch.cat([g.reshape(-1) for g in torch.autograd.grad(uni[m], params, retain_graph=True)])
        assert not torch.allclose(g_mm, g_u)
        expected[m] = (F.cosine_similarity(g_mm, g_u, dim=0), g_mm, g_u)
        close(torch.cat([g.reshape(-1) for g in method._g_u[m]]), g_u)
    model.zero_grad()
    method.aux.zero_grad()
    total_loss(ctx).backward()
    method.after_backward(ctx)
    for m in AV:
        cos, g_mm, g_u = expected[m]
        close(ctx.metrics[f"mmpareto_cos_{m}"], cos)
        assert ctx.metrics[f"mmpareto_cos_{m}"] < 0.999
        # the encoder's new gradient follows from the two independent gradients
        c1, _ = pareto_weights(g_mm, g_u)
        sizes = [p.numel() for p in model.encoders[m].parameters()]
        want, _ = pareto_gradients(
            [a + b for a, b in zip(g_mm.split(sizes), g_u.split(sizes))],
            list(g_mm.split(sizes)),
            list(g_u.split(sizes)),
            c1,
            1.5,
        )
        got = torch.cat([p.grad.reshape(-1) for p in model.encoders[m].parameters()])
        close(got, torch.cat(want), atol=1e-6)


def test_mmpareto_balancebenchmark_compares_the_summed_gradient_with_itself():
    model, method, ctx, _, inputs, labels = _mmpareto_step("balancebenchmark")
    assert method.aux is None and method.extra_module() is None
    for m in AV:
        close(ctx.metrics[f"mmpareto_cos_{m}"], 1.0)
        close(ctx.metrics[f"mmpareto_c1_{m}"], 0.5)
    # the encoder gradient is 2γ = 3 times the gradient of L_mm + Σ_m CE(W-slice logits)
    torch.manual_seed(0)
    fresh = mlp_model()  # the same initial weights
    feats = fresh.encode(inputs)
    uni = fresh.head.unimodal_logits(feats)
    loss = F.cross_entropy(fresh.head(feats), labels) + sum(F.cross_entropy(uni[m], labels) for m in AV)
    loss.backward()
    for m in AV:
        for p, q in zip(model.encoders[m].parameters(), fresh.encoders[m].parameters()):
            close(p.grad, 3.0 * q.grad, atol=1e-6)


# --- MMCosine --------------------------------------------------------------------------------------------------
def test_mmcosine_logits_are_scaled_sums_of_per_modality_cosines():
    head = ConcatFusion({"audio": 2, "visual": 2}, 2)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 3.0], [0.0, 2.0, 1.0, 1.0]]))
        head.fc.bias.fill_(5.0)  # dropped
    wrapped = CosineHead(head, scale=10.0)
    feats = {"audio": torch.tensor([[3.0, 4.0]]), "visual": torch.tensor([[0.0, 2.0]])}
    # audio: φ/‖φ‖ = [0.6, 0.8]; rows [1, 0] and [0, 1] -> [0.6, 0.8]
    # visual: φ/‖φ‖ = [0, 1]; rows [0, 1] and [1, 1]/√2 -> [1, 1/√2]
    close(wrapped.natural_unimodal(feats)["audio"], [[6.0, 8.0]])
    close(wrapped(feats), [[6.0 + 10.0, 8.0 + 10.0 / math.sqrt(2)]])
    close(cosine_logits(feats["audio"], torch.tensor([[1.0, 0.0]]), 2.0), [[1.2]])
    assert not head.fc.bias.requires_grad  # frozen: out of the optimizer, weight decay cannot move it
    close(wrapped.zero_out_unimodal(feats)["visual"], [[10.0, 10.0 / math.sqrt(2)]])  # zeroing removes a term


def test_mmcosine_wraps_the_head_so_a_saved_model_predicts_with_cosine_logits():
    model = mlp_model()
    MMCosine(scale=7.0).setup(model, 3)
    assert isinstance(model.head, CosineHead)
    inputs, _ = batch()
    fresh = mlp_model()
    MMCosine(scale=7.0).setup(fresh, 3)  # what load_run does before loading best.pt
    fresh.load_state_dict(model.state_dict())
    close(fresh(inputs), model(inputs))
    assert fresh(inputs).abs().max() <= 2 * 7.0 + 1e-5  # bounded by M·s


def test_mmcosine_refuses_a_head_without_per_modality_blocks():
    model = MultimodalModel({m: MLPEncoder(5, 6, 4) for m in AV}, FiLMFusion({m: 4 for m in AV}, 3))
    with pytest.raises(ValueError, match="fusion=concat"):
        MMCosine().setup(model, 3)


def test_mmcosine_contrastive_term_by_hand():
    f = torch.eye(2)  # two samples, different labels, each feature its own class direction; τ = 1
    loss = supervised_nce(f, f, torch.tensor([0, 1]), temperature=1.0)
    p = math.e / (math.e + 1)  # softmax([1, 0])[0]; the other-label entry has 1 − p = p
    close(loss, -2 * math.log(p + 1e-10), atol=1e-6)
    same = supervised_nce(f, f, torch.tensor([0, 0]), temperature=1.0)  # no other-label partner: finite
    assert torch.isfinite(same)


# --- UMT and UME -----------------------------------------------------------------------------------------------
def test_umt_distillation_is_a_mean_squared_error_to_constant_teacher_features():
    student = {"audio": torch.tensor([[1.0, 2.0]], requires_grad=True), "visual": torch.tensor([[0.0, 0.0, 3.0]])}
    teacher = {"audio": torch.tensor([[0.0, 0.0]], requires_grad=True), "visual": torch.tensor([[0.0, 0.0, 0.0]])}
    mse = distill_losses(student, teacher)
    close(mse, [2.5, 3.0])  # (1 + 4)/2, 9/3
    mse[0].backward()
    close(student["audio"].grad, [[1.0, 2.0]])  # 2(φ − t)/n
    assert teacher["audio"].grad is None


def test_umt_loads_a_teacher_from_a_run_folder_and_refuses_bad_files(tmp_path):
    source = MLPEncoder(5, 6, 4)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": {f"encoders.audio.{k}": v for k, v in source.state_dict().items()}}, run / "best.pt")
    target = MLPEncoder(5, 6, 4)
    load_teacher(target, run, "audio")
    for a, b in zip(source.parameters(), target.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"trainer.modalities=\[audio\]"):
        load_teacher(target, tmp_path / "nowhere", "audio")
    with pytest.raises(ValueError, match="holds no visual encoder"):
        load_teacher(target, run / "best.pt", "visual")
    with pytest.raises(ValueError, match="same backbone"):
        load_teacher(MLPEncoder(5, 6, 8), run, "audio")
    torch.save({"model": {"x": pd.Timestamp("2020-01-01")}}, tmp_path / "planted.pt")  # not weights-only
    with pytest.raises(ValueError, match="weights-only"):
        load_teacher(target, tmp_path / "planted.pt", "audio")


def test_umt_without_teachers_and_without_stage_one_refuses_with_the_fix():
    umt = UMT(train_teachers=False, teachers={"audio": "/somewhere"})
    umt.setup(mlp_model(), 3)
    with pytest.raises(ValueError, match=r"\+modulation.teachers.visual=<run folder or best.pt> \("):
        umt.prerequisites()
    asked = UMT(teacher_epochs=3)
    asked.setup(mlp_model(), 3)
    assert asked.prerequisites() == {f"teacher_{m}": {"trainer.modalities": [m], "trainer.epochs": 3} for m in AV}


def test_ume_predicts_with_the_ensemble_of_uni_modal_heads():
    head = EnsembleHead({"audio": 2, "visual": 2}, 2)
    with torch.no_grad():
        head.heads["audio"].weight.copy_(torch.eye(2))
        head.heads["visual"].weight.copy_(torch.tensor([[0.0, 2.0], [0.0, 0.0]]))
        head.heads["audio"].bias.zero_()
        head.heads["visual"].bias.zero_()
    feats = {"audio": torch.tensor([[1.0, 3.0]]), "visual": torch.tensor([[5.0, 1.0]])}
    # audio logits [1, 3]; visual [2, 0]; mean [1.5, 1.5]
    close(head(feats), [[1.5, 1.5]])
    head.combine = type(head.combine)("probs")
    pa, pv = torch.softmax(torch.tensor([1.0, 3.0]), 0), torch.softmax(torch.tensor([2.0, 0.0]), 0)
    close(head(feats), torch.log((pa + pv) / 2)[None])


def test_ume_trains_each_modality_alone_and_wraps_the_head():
    model = mlp_model()
    ume = UME()
    ume.setup(model, 3)
    assert isinstance(model.head, EnsembleHead)
    inputs, labels = batch()
    ctx = step_ctx(model, inputs, labels)
    ume.after_forward(ctx)
    assert ctx.loss_weight == 0.0
    for m in AV:
        close(ctx.extra_losses[f"ume_{m}"], F.cross_entropy(model.head.heads[m](ctx.features[m]), labels))
    close(
        ctx.logits,
        (model.head.heads["audio"](ctx.features["audio"]) + model.head.heads["visual"](ctx.features["visual"])) / 2,
    )


# --- end to end: each method (and each variant) on the tiny synthetic benchmark ------------------------------------
E2E = {
    "pmr": (["modulation=pmr"], ["pmr_beta_audio", "pmr_score_visual", "pmr_pce_audio"]),
    "pmr_bb3": (["modulation=pmr", "modulation.variant=balancebenchmark", "dataset=synth_av3"], ["pmr_k_sensor"]),
    "agm": (["modulation=agm"], ["agm_kappa_audio", "agm_ratio_visual", "agm_clip"]),
    "agm_bb": (["modulation=agm", "modulation.variant=balancebenchmark"], ["agm_kappa_audio"]),
    "agm_exact3": (["modulation=agm", "modulation.passes=exact", "dataset=synth_av3"], ["agm_kappa_sensor"]),
    "mmpareto": (["modulation=mmpareto", "optim=sgd"], ["mmpareto_cos_audio", "mmpareto_c1_visual"]),
    "mmpareto_bb": (["modulation=mmpareto", "modulation.variant=balancebenchmark"], ["mmpareto_cos_audio"]),
    "mmcosine": (["modulation=mmcosine", "modulation.nce_weight=0.1"], ["mmcosine_logit_audio"]),
    "ume": (["modulation=ume"], ["ume_loss_audio"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(E2E))
def test_each_method_trains_end_to_end_and_logs_its_coefficients(case, train_run):
    overrides, columns = E2E[case]
    results, out = train_run(*overrides)
    assert read_results(out)["status"] == "ok" and results["status"] == "ok"
    steps = steps_of(out)
    for column in columns:
        assert f"train/{column}" in steps.columns
        assert steps[f"train/{column}"].notna().all()
    if case == "mmpareto_bb":
        # the benchmark's degenerate comparison: cos = 1 (to rounding), never a conflict
        assert steps["train/mmpareto_cos_audio"].sub(1.0).abs().max() < 1e-5
        assert not steps["train/mmpareto_conflict_audio"].any()
    if case == "pmr_bb3":
        assert "train/pmr_pce_sensor" in steps.columns and not steps["train/pmr_beta_sensor"].any()


@pytest.mark.slow
def test_ume_run_folder_predicts_with_the_ensemble(train_run):
    from onthefly.engine.analysis import load_run

    _, out = train_run("modulation=ume")
    _, model, splits, _ = load_run(out, "cpu")
    assert isinstance(model.head, EnsembleHead)
    item = splits.test[0]
    inputs = {m: item[m][None] for m in model.modalities}
    model.eval()
    with torch.no_grad():
        feats = model.encode(inputs)
        close(model(inputs), sum(model.head.heads[m](feats[m]) for m in model.modalities) / 2)


@pytest.mark.slow
def test_umt_trains_its_teachers_first_then_reuses_named_ones(train_run):
    results, out = train_run("modulation=umt", name="first")
    assert results["status"] == "ok"
    for m in AV:
        assert read_results(out / "prerequisites" / f"teacher_{m}")["status"] == "ok"
        assert read_results(out / "prerequisites" / f"teacher_{m}")["modalities"] == [m]
    assert steps_of(out)["train/umt_mse_audio"].notna().all()
    teachers = [f"+modulation.teachers.{m}={out / 'prerequisites' / f'teacher_{m}'}" for m in AV]
    results, again = train_run(
        "modulation=umt",
        *teachers,
        "modulation.train_teachers=false",
        "modulation.variant=balancebenchmark",
        name="named",
    )
    assert results["status"] == "ok" and not (again / "prerequisites").exists()


# --- the zoo table specs -------------------------------------------------------------------------------------------
ZOO_ROWS = {
    "none",
    "ogm_ge",
    "opm",
    "opm_ogm",
    "gblending",
    "pmr",
    "agm",
    "mmpareto",
    "mmcosine",
    "umt",
    "ume",
    "cml",
    "lfm",
    "inforeg",
    "mbsd",
    "amco",
    "greedy",
    "mla",
    "reconboost",
    "relearning",
    "valuation_sample",
    "valuation_modality",
}
SGD_ROWS = ("agm", "mmpareto", "inforeg", "mla", "reconboost", "relearning")  # their authors' optimizer


def _spec_with_known_methods(name: str, tmp_path):
    """The spec with only the rows whose method config exists in this tree (the part-1b methods arrive from another
    branch), loaded through the table loader."""
    import yaml

    from onthefly.config import CONF_DIR
    from onthefly.tables.spec import EXPERIMENTS_DIR, load_spec

    raw = yaml.safe_load((EXPERIMENTS_DIR / f"{name}.yaml").read_text())
    assert set(raw["rows"]) == ZOO_ROWS
    assert raw["columns"].keys() == (
        {"synth_av"} if name == "zoo-demo" else {"cremad", "kinetics_sounds", "ucf101", "vggsound"}
    )

    def method(row):
        return next(o.split("=", 1)[1] for o in row["overrides"] if o.startswith("modulation="))

    raw["rows"] = {rid: r for rid, r in raw["rows"].items() if (CONF_DIR / "modulation" / f"{method(r)}.yaml").exists()}
    assert {"none", "pmr", "agm", "mmpareto", "mmcosine", "umt", "ume"} <= set(raw["rows"])
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_spec(path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zoo", "zoo-demo"])
def test_zoo_specs_compose_every_cell_of_the_methods_present(name, tmp_path):
    from onthefly.config import compose

    spec = _spec_with_known_methods(name, tmp_path)
    for row, col in spec.run_cells():
        cfg = compose(spec.cell_overrides(row, col))
        gradient_scaling = row.id in SGD_ROWS
        expected = (
            "SGD"
            if gradient_scaling
            else ("Adam" if row.id.startswith("valuation") and col.id == "kinetics_sounds" else "AdamW")
        )  # valuation's released Kinetics-Sounds recipe: Adam
        assert cfg.optim._target_.rsplit(".", 1)[1] == expected, (row.id, col.id)
        if gradient_scaling:
            assert cfg.optim.weight_decay == pytest.approx(1e-4)
        if name == "zoo" and row.id == "pmr":
            assert (cfg.modulation.alpha, cfg.modulation.momentum, cfg.modulation.end) == (2.0, 0.0, 70)
        if name == "zoo" and row.id == "mmpareto":
            assert cfg.optim.lr == pytest.approx(2e-3) and cfg.scheduler.gamma == 1.0  # a constant rate


def test_zoo_published_rows_name_the_benchmarks_methods():
    import csv

    import yaml

    from onthefly.tables.spec import EXPERIMENTS_DIR

    raw = yaml.safe_load((EXPERIMENTS_DIR / "zoo.yaml").read_text())
    with open(EXPERIMENTS_DIR / "published_results.csv") as fh:
        published = {(r["dataset"], r["method"]) for r in csv.DictReader(fh) if r["source"] == "balancebenchmark_2025"}
    for rid, row in raw["rows"].items():
        if row.get("published"):  # every method the benchmark has is on its two main datasets (Greedy: not UCF-101)
            for col in ("cremad", "kinetics_sounds"):
                assert (col, row["published"]["method"]) in published, (rid, col)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["modulation=pmr", "modulation.proto_fraction=0"], "modulation.proto_fraction"),
        (["modulation=pmr", "modulation.momentum=1.5"], "modulation.momentum"),
        (["modulation=agm", "modulation.clip=0"], "modulation.clip"),
        (["modulation=mmpareto", "modulation.gamma=-1"], "modulation.gamma"),
        (["modulation=mmcosine", "modulation.scale=0"], "modulation.scale"),
        (["modulation=umt", "modulation.teacher_epochs=0"], "modulation.teacher_epochs"),
        (["modulation=agm", "modulation.variant=bb"], "modulation.variant"),
    ],
)
def test_zoo_options_out_of_range_fail_at_compose_time_naming_the_key(overrides, key):
    from onthefly.config import compose

    with pytest.raises(Exception, match=key.replace(".", r"\.")):
        compose(overrides)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ["modulation=pmr", "modulation.momentum=0.5"],
        ["modulation=agm"],
        ["modulation=umt", "modulation.variant=balancebenchmark"],
    ],
    ids=["pmr", "agm", "umt_bb"],
)
def test_a_resume_mid_epoch_equals_the_uninterrupted_run(overrides, train_run, tmp_path):
    """The methods' state (prototypes, running targets) is in the checkpoint and UMT's teachers are read again:
    resuming in the middle of epoch 1 gives the same numbers."""
    import shutil

    from onthefly.engine import checkpoint as ckpt

    common = [*overrides, "trainer.checkpoint_every_n_steps=3", "trainer.keep_checkpoints=10", "trainer.epochs=3"]
    _, full = train_run(*common, name="full")
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt.path_for(full, 6), part / "checkpoints")  # 4 steps an epoch: step 6 is inside epoch 1
    shutil.copy(full / "steps.csv", part)
    if (full / "prerequisites").exists():
        shutil.copytree(full / "prerequisites", part / "prerequisites")
    _, resumed = train_run(*common, "trainer.resume=auto", name="part")
    pd.testing.assert_frame_equal(steps_of(full), steps_of(resumed), check_exact=True)
