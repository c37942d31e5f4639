"""MMTM: the multimodal transfer module (Vaezi Joze et al., CVPR 2020) between the stages of two ResNet18s
(docs/method.md §10.1).

At each chosen level l, every modality's map is squeezed to one vector per clip (mean over its own frames and
space), the squeezes are joined, Z = ReLU(W_Z [S_a; S_v] + b_Z), and each modality's channels are re-weighted by
its excitation E_m = s·σ(W_m Z + b_m) (s = ``gate_scale``; 1 in every released code), broadcast over space and
repeated over the clip's frames. Frames folded into the batch ([B·T, C, H, W]) are squeezed per clip, which the
released MMTMs do not do (they pair B audio rows with B·T visual rows).

What the module reads from the step's context (docs/method.md §10.4, §10.5):

* ``ctx.keep`` [B, M] (OPM): for a sample whose modality m is dropped, m's squeeze at every level is replaced by
  its running mean S̄_m (EMA over training forwards, detached), so m cannot steer the other modality's gates;
* ``ctx.curation`` (Greedy): the curated branch c is gated by its running-average gate Ē_c, the same for every
  sample, so it gets no sample-specific information from the other modality.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Mapping, Optional

import torch
from torch import nn

from onthefly.config import ConfigError, PositiveFloat, PositiveInt, Probability, configurable
from onthefly.models.interaction import Interaction


class MMTMUnit(nn.Module):
    """One transfer module over the modalities' channel counts {m: C_m}: 4C² + 3C parameters for two C-channel
    streams at ratio 4. Buffers: the running squeeze mean S̄_m (OPM) and the cumulative mean gate Ē_m (Greedy)."""

    def __init__(self, channels: Mapping[str, int], ratio: int = 4, gate_scale: float = 1.0):
        super().__init__()
        total = sum(channels.values())
        hidden = int(2 * total / ratio)
        self.channels = dict(channels)
        self.gate_scale = float(gate_scale)
        self.squeeze = nn.Linear(total, hidden)
        self.excite = nn.ModuleDict({m: nn.Linear(hidden, c) for m, c in channels.items()})
        for m, c in channels.items():
            self.register_buffer(f"squeeze_mean_{m}", torch.zeros(c))
            self.register_buffer(f"gate_mean_{m}", torch.zeros(c))
        self.register_buffer("squeeze_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("gate_count", torch.zeros((), dtype=torch.long))

    def code(self, squeezes: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.relu(self.squeeze(torch.cat([squeezes[m] for m in self.channels], dim=1)))

    def gate(self, modality: str, code: torch.Tensor) -> torch.Tensor:
        return self.gate_scale * torch.sigmoid(self.excite[modality](code))

    def squeeze_mean(self, modality: str) -> torch.Tensor:
        return getattr(self, f"squeeze_mean_{modality}")

    def gate_mean(self, modality: str) -> torch.Tensor:
        return getattr(self, f"gate_mean_{modality}")

    @torch.no_grad()
    def update_squeeze_means(self, squeezes: Mapping[str, torch.Tensor], momentum: float) -> None:
        """S̄_m ← μ·S̄_m + (1 − μ)·mean_batch(S_m), the first batch taken as it is (no host sync)."""
        first = self.squeeze_count == 0
        for m, s in squeezes.items():
            mean = self.squeeze_mean(m)
            batch = s.detach().float().mean(0)
            mean.copy_(torch.where(first, batch, momentum * mean + (1 - momentum) * batch))
        self.squeeze_count += 1

    @torch.no_grad()
    def update_gate_means(self, gates: Mapping[str, torch.Tensor], copy_slip: bool = False) -> None:
        """Ē_m ← cumulative mean of the batch-mean gates. ``copy_slip`` reproduces the released Greedy code, which
        feeds the second modality's average from the first modality's gates."""
        n = self.gate_count.float()
        mods = list(self.channels)
        for i, m in enumerate(mods):
            source = gates[mods[0]] if (copy_slip and i == 1) else gates[m]
            mean = self.gate_mean(m)
            mean.add_((source.detach().float().mean(0) - mean) / (n + 1))
        self.gate_count += 1


@configurable("interaction", runtime=("encoders",))
class MMTM(Interaction):
    """Transfer modules after the chosen ResNet18 stages (default 2-4, the Greedy and PMR placement; BMM also puts
    one after stage 1). Features: each stream's global average after the last stage (z_m)."""

    fusion_name = "mmtm"

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        levels: List[int] = [2, 3, 4],  # noqa: B006
        ratio: PositiveInt = 4,
        gate_scale: PositiveFloat = 1.0,
        drop_squeeze: bool = True,
        squeeze_momentum: Probability = 0.99,
        log_gates: bool = True,
    ):
        super().__init__(encoders)
        bad = [lv for lv in levels if lv not in (1, 2, 3, 4)]
        if bad or not levels:
            raise ConfigError(f"fusion.interaction.levels must name ResNet18 stages 1..4, got {list(levels)}")
        channels = {m: enc.stage_channels for m, enc in encoders.items()}
        self.levels = sorted(set(int(lv) for lv in levels))
        self.units = nn.ModuleDict(
            {str(lv): MMTMUnit({m: c[lv - 1] for m, c in channels.items()}, ratio, gate_scale) for lv in self.levels}
        )
        self.feature_dims = {m: c[-1] for m, c in channels.items()}
        self.drop_squeeze, self.momentum, self.log_gates = bool(drop_squeeze), float(squeeze_momentum), log_gates
        # set by a method that curates (Greedy): update Ē in evaluation forwards too; reproduce the copy slip
        self.average_gates_in_eval = False
        self.gate_average_bug = False
        self._isolation: Optional[Dict[int, Dict[str, torch.Tensor]]] = None  # utilisation mode
        self._recording: Optional[Dict[int, Dict[str, list]]] = None

    supports_curation = True  # per-branch gates that Greedy can replace by their running average

    @property
    def reads_keep_masks(self) -> bool:  # OPM's drop reaches the squeezes (else it drops only at the head)
        return self.drop_squeeze

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        """m's excitation layer at every level (the squeeze layer is shared by all modalities)."""
        return [p for unit in self.units.values() for p in unit.excite[modality].parameters()]

    # --- forward ---------------------------------------------------------------------------------------------
    def forward(self, encoders, inputs, ctx=None):
        hs, frames = self.stems(encoders, inputs)
        keep = getattr(ctx, "keep", None) if self.drop_squeeze else None
        curation = getattr(ctx, "curation", None)
        for level in range(1, 5):
            hs = {m: encoders[m].stage(level, h) for m, h in hs.items()}
            if level in self.levels:
                hs = self._transfer(level, encoders, hs, frames, keep, curation, ctx)
        return {m: encoders[m].pool(h, frames[m]) for m, h in hs.items()}

    def _transfer(self, level, encoders, hs, frames, keep, curation, ctx):
        unit: MMTMUnit = self.units[str(level)]
        mods = self.modalities
        squeezes = {m: encoders[m].pool(hs[m], frames[m]) for m in mods}  # [B, C_m], each over its own T, H, W
        if self._recording is not None:
            for m in mods:
                self._recording[level].setdefault(m, []).append(squeezes[m].detach().float().sum(0))
        if self._isolation is not None:
            means = self._isolation[level]  # each gate: own squeeze, the others' means
            gates = {}
            for m in mods:
                used = {
                    k: squeezes[k] if k == m else means[k].to(squeezes[k].dtype).expand_as(squeezes[k]) for k in mods
                }
                gates[m] = unit.gate(m, unit.code(used))
        else:
            used = squeezes
            if keep is not None:  # OPM: a dropped modality's squeeze -> its running mean (detached)
                used = {
                    m: torch.where(
                        keep[:, i, None],
                        squeezes[m],
                        torch.where(
                            unit.squeeze_count > 0, unit.squeeze_mean(m), squeezes[m].detach().float().mean(0)
                        ).to(squeezes[m].dtype),
                    )
                    for i, m in enumerate(mods)
                }
            code = unit.code(used)
            gates = {m: unit.gate(m, code) for m in mods}
        if self.training:
            unit.update_squeeze_means(squeezes, self.momentum)
        if self._isolation is None and (self.training or self.average_gates_in_eval):
            unit.update_gate_means(gates, self.gate_average_bug)
        if curation is not None:  # Greedy: the curated branch gets its average gate, the same for every sample
            gates[curation] = unit.gate_mean(curation).to(gates[curation].dtype).expand_as(gates[curation])
        if ctx is not None and self.log_gates:
            for m in mods:
                e = gates[m].detach().float()
                ctx.metrics[f"mmtm{level}_gate_{m}"] = e.mean()
                ctx.metrics[f"mmtm{level}_gate_std_{m}"] = e.std() if e.numel() > 1 else e.new_zeros(())
                ctx.metrics[f"mmtm{level}_gate_low_{m}"] = (e < 0.1).float().mean()
                ctx.metrics[f"mmtm{level}_gate_high_{m}"] = (e > 0.9).float().mean()
        # out of place, repeated over each clip's frames, broadcast over space
        return {m: hs[m] * gates[m].repeat_interleave(frames[m], dim=0)[:, :, None, None] for m in mods}

    # --- conditional utilisation (Greedy's mechanism, docs/method.md §10.5) ----------------------------------
    @contextlib.contextmanager
    def isolated(self, means: Dict[int, Dict[str, torch.Tensor]]):
        """Within the block, each stream's gates see the other modalities' squeezes as the fixed ``means``."""
        self._isolation = means
        try:
            yield self
        finally:
            self._isolation = None

    @torch.no_grad()
    def squeeze_means(self, model, batches) -> Dict[int, Dict[str, torch.Tensor]]:
        """{level: {m: mean squeeze}} over the given batches (the training split), in evaluation mode."""
        self._recording = {lv: {} for lv in self.levels}
        n = 0
        try:
            for inputs, labels in batches:
                model.encode(inputs)
                n += len(labels)
            return {
                lv: {m: torch.stack(v).sum(0) / max(n, 1) for m, v in rec.items()}
                for lv, rec in self._recording.items()
            }
        finally:
            self._recording = None

    @torch.no_grad()
    def conditional_utilisation(self, model, train_batches, eval_batches, task=None) -> Dict[str, float]:
        """u(m_1|m_0) = (A_0(m_0, m_1) − A_0(m_0)) / A_0(m_0, m_1), with A_0 the accuracy of branch m_0's own
        logits (the head's uni-modal logits) and A_0(m_0) measured with m_1 reaching every MMTM only through its
        training-set mean squeeze; the other direction alike, both from one isolated pass (two modalities)."""
        from onthefly.models.utilisation import utilisation_rates

        if len(self.modalities) != 2:
            raise ValueError("the MMTM conditional utilisation rate is defined for two modalities")
        was = model.training
        model.eval()
        try:
            means = self.squeeze_means(model, train_batches)
            correct = {"full": torch.zeros(2), "alone": torch.zeros(2)}
            total = 0
            for inputs, labels in eval_batches:
                for mode in correct:
                    with self.isolated(means) if mode == "alone" else contextlib.nullcontext():
                        logits = _branch_logits(model, model.encode(inputs), task)
                    correct[mode] += torch.stack(
                        [(logits[m].argmax(1) == labels).sum().cpu().float() for m in self.modalities]
                    )
                total += len(labels)
        finally:
            model.train(was)
        acc = {mode: (c / max(total, 1)).tolist() for mode, c in correct.items()}
        m0, m1 = self.modalities
        # the use of m1 is read off branch m0 (and the other way round)
        return utilisation_rates(
            self.modalities, {m1: acc["full"][0], m0: acc["full"][1]}, {m1: acc["alone"][0], m0: acc["alone"][1]}
        )


def _branch_logits(model, feats, task) -> Dict[str, torch.Tensor]:
    logits = model.head.unimodal_logits(feats, "natural")
    return {m: task.class_logits(z) if task is not None else z for m, z in logits.items()}
