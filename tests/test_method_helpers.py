"""The helpers methods share: per-loss gradients (autograd None -> zeros, float32, graph kept) and uni-modal heads."""

from __future__ import annotations

import torch

from onthefly.modulation.helpers import UnimodalHeads, flat, loss_gradients, set_gradients


def test_loss_gradients_match_hand_derivatives_and_keep_the_graph():
    a = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor([3.0], requires_grad=True)
    y = (a * a).sum() + 0 * b.sum()
    losses = {"sq": y, "lin": (2 * a).sum()}  # "lin" never reaches b
    grads = loss_gradients(losses, [a, b])
    assert torch.equal(grads["sq"][0], torch.tensor([2.0, 4.0])) and torch.equal(
        grads["lin"][0], torch.tensor([2.0, 2.0])
    )
    assert torch.equal(grads["lin"][1], torch.zeros(1)) and grads["lin"][1].dtype == torch.float32
    y.backward()  # the graph was kept: the step's own backward still runs
    assert torch.equal(a.grad, torch.tensor([2.0, 4.0]))
    assert torch.equal(flat(grads["sq"]), torch.tensor([2.0, 4.0, 0.0]))


def test_set_gradients_replaces_and_casts():
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    p.grad = torch.ones(2, dtype=torch.float64)
    g = torch.tensor([0.5, -1.0])
    set_gradients([p], [g])
    assert p.grad.dtype == torch.float64 and torch.equal(p.grad, g.double())
    g.zero_()
    assert p.grad.abs().sum() > 0  # a copy, not a view of the caller's tensor


def test_unimodal_heads_one_linear_per_modality():
    heads = UnimodalHeads({"audio": 4, "visual": 6}, num_classes=3)
    out = heads({"audio": torch.randn(5, 4), "visual": torch.randn(5, 6), "question": torch.randn(5, 2)})
    assert set(out) == {"audio", "visual"} and out["visual"].shape == (5, 3)
