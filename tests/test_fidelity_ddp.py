"""The released OPM under data parallelism (2 gloo processes on CPU; the harness of test_ddp.py): with its rescale
gradient, one DDP step equals one single-process step on the global batch; its p_exe decision is one per global
batch, the same on every rank."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from test_ddp import GLOBAL_BATCH, WORLD, _free_port, _one_step, _rank_main


@pytest.mark.slow
def test_ddp_step_with_the_released_rescale_gradient_equals_the_global_batch_step(tmp_path):
    overrides = ["modulation=opm", "modulation.p_exe=1.0", "modulation.rescale_grad=true"]
    mp.spawn(_rank_main, args=(_free_port(), overrides, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    from onthefly.engine.distributed import DistInfo

    replay = torch.cat([r["masks"][0] for r in ranks])
    single = _one_step(overrides, DistInfo(), torch.device("cpu"), slice(0, GLOBAL_BATCH), replay_masks=replay)
    plain = _one_step(overrides[:2], DistInfo(), torch.device("cpu"), slice(0, GLOBAL_BATCH), replay_masks=replay)
    moved = [n for n, w in single["weights"].items() if not torch.allclose(w, plain["weights"][n], atol=1e-7)]
    assert moved, "the rescale gradient changed no weight: the comparison would not see it"
    for r, got in enumerate(ranks):
        assert got["loss"] == pytest.approx(single["loss"], rel=1e-5, abs=1e-6)
        for name, w in single["weights"].items():
            torch.testing.assert_close(got["weights"][name], w, rtol=1e-5, atol=1e-6, msg=f"{name} on rank {r}")


@pytest.mark.slow
def test_exe_draw_global_batch_is_one_decision_for_every_rank(tmp_path):
    decisions = {}
    for seed in range(3):  # a decision of 0.5 per step: over three steps the ranks would differ somewhere
        out = tmp_path / f"s{seed}"
        out.mkdir()
        overrides = ["modulation=opm", "modulation.p_exe=0.5", "modulation.exe_draw=global_batch", f"seed={seed}"]
        mp.spawn(_rank_main, args=(_free_port(), overrides, str(out)), nprocs=WORLD, join=True)
        ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
        decisions[seed] = [bool(r["masks"]) for r in ranks]  # a rank that dropped recorded its masks
        assert decisions[seed][0] == decisions[seed][1], f"seed {seed}: ranks took different p_exe decisions"
    assert len({d[0] for d in decisions.values()}) == 2, "every step took the same decision: not a test of the draw"
