"""The multimodal model: one encoder per modality (by name), optional context encoders, an optional interaction
module (mid-fusion: the modalities exchange information inside the encoders), and a fusion head.

``encode(inputs, ctx)`` returns one dict: each modality's features (the ones OGM/OPM balance), each context
input's encoding (AVQA's question: what the head is asked, never balanced), every other input entry unchanged
(side targets such as MOSI's score, which the task reads), and any side entries the interaction adds. Heads read
the keys they know.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

import torch
from hydra.utils import instantiate
from torch import nn

from onthefly.config import ConfigError
from onthefly.models.fusion import FusionHead


class MultimodalModel(nn.Module):
    def __init__(
        self,
        encoders: Dict[str, nn.Module],
        head: FusionHead,
        context: Optional[Dict[str, nn.Module]] = None,
        passthrough: Iterable[str] = (),
        interaction: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.context = nn.ModuleDict(context or {})
        self.interaction = interaction  # None: late fusion (no parameter of its own, state_dict unchanged)
        self.head = head
        self.passthrough = list(passthrough)

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    @property
    def input_keys(self) -> list[str]:
        """Batch entries the model reads: modalities, context inputs, passed-through side targets."""
        return [*self.encoders, *self.context, *self.passthrough]

    @property
    def feature_dims(self) -> Dict[str, int]:
        if self.interaction is not None:
            return dict(self.interaction.feature_dims)
        return {m: enc.out_dim for m, enc in self.encoders.items()}

    @property
    def reads_keep_masks(self) -> bool:
        """True when the interaction applies a method's keep masks (``ctx.keep``) inside the forward (MMTM)."""
        return bool(getattr(self.interaction, "reads_keep_masks", False))

    @property
    def shares_parameters(self) -> bool:
        """True when the modalities' feature paths share parameters (a shared transformer)."""
        return bool(getattr(self.interaction, "shares_parameters", False))

    def encode(self, inputs: Dict[str, Any], ctx: Any = None) -> Dict[str, torch.Tensor]:
        """Features of every modality and context input, plus the passed-through entries. ``ctx``: the training
        step's context (None at evaluation), the one argument through which a method reaches inside the forward:
        the interaction reads ``ctx.keep`` (OPM's keep masks) and ``ctx.curation`` (Greedy's curated branch) and may
        log into ``ctx.metrics``; plain encoders ignore it."""
        if self.interaction is not None:
            out = self.interaction(self.encoders, inputs, ctx)
        else:
            out = {m: enc(inputs[m]) for m, enc in self.encoders.items()}
        out.update({k: enc(inputs[k]) for k, enc in self.context.items()})
        out.update({k: inputs[k] for k in self.passthrough if k in inputs})
        return out

    def forward(self, inputs: Dict[str, Any]) -> torch.Tensor:
        return self.head(self.encode(inputs))


def _build_encoder(config, args: dict, key: str, backbone: str) -> nn.Module:
    try:
        return instantiate(config, **args)
    except Exception as err:  # noqa: BLE001 (name the encoder and the data's arguments)
        if not args:
            raise
        raise ValueError(
            f"backbone '{backbone}' could not build the {key!r} encoder with the arguments this dataset gives it "
            f"({args}): {err}. Pick a backbone made for this data (MOSI: backbone=transformer or lstm)."
        ) from err


def build_model(
    cfg,
    modalities: list[str],
    num_classes: int,
    *,
    encoder_args: Optional[dict] = None,
    context: Iterable[str] = (),
    passthrough: Iterable[str] = (),
) -> MultimodalModel:
    """Encoders from ``cfg.backbone.encoders[<modality>]`` (and ``cfg.backbone.context[<key>]`` for each context
    input), each given the dataset's ``encoder_args[<key>]`` (feature sizes, vocabulary size); the head from
    ``cfg.fusion`` with ``num_classes`` outputs (and ``context_dims`` when there is context)."""
    available = cfg.backbone.encoders
    encoder_args = dict(encoder_args or {})
    missing = [m for m in modalities if m not in available]
    if missing:
        raise ValueError(
            f"backbone '{cfg.backbone.name}' has no encoder for modality {missing}; it has {list(available)}. "
            "Pick a backbone that covers the dataset's modalities (or add one in conf/backbone/)."
        )
    context = list(context)
    available_context = cfg.backbone.get("context") or {}
    missing = [k for k in context if k not in available_context]
    if missing:
        raise ValueError(
            f"the dataset's context input(s) {missing} need an encoder under backbone.context, which backbone "
            f"'{cfg.backbone.name}' lacks; use the dataset's preset (e.g. dataset=avqa) or add one."
        )
    name = cfg.backbone.name
    encoders = {m: _build_encoder(available[m], encoder_args.get(m, {}), m, name) for m in modalities}
    context_encoders = {k: _build_encoder(available_context[k], encoder_args.get(k, {}), k, name) for k in context}
    runtime: dict[str, Any] = {"feature_dims": {m: e.out_dim for m, e in encoders.items()}, "num_classes": num_classes}
    if context_encoders:
        runtime["context_dims"] = {k: e.out_dim for k, e in context_encoders.items()}
    head_cfg, interaction = cfg.fusion, None
    if "interaction" in cfg.fusion:  # mid-fusion: conf/fusion/<name>.yaml names an interaction module and a head
        try:
            interaction = instantiate(cfg.fusion.interaction, encoders=encoders)
        except Exception as err:  # noqa: BLE001 (Hydra wraps the module's refusal of the setting; give that one)
            if not isinstance(err.__cause__, ConfigError):
                raise
            raise ConfigError(str(err.__cause__)) from err
        runtime.update(feature_dims=dict(interaction.feature_dims), **interaction.head_args)
        head_cfg = cfg.fusion.head
    try:
        head = instantiate(head_cfg, **runtime)
    except Exception as err:  # noqa: BLE001 (Hydra wraps the TypeError of an unexpected argument)
        if "context_dims" not in runtime:
            raise
        raise ValueError(
            f"fusion head {cfg.fusion._target_} cannot use the dataset's context inputs {context} "
            f"({err}); use a question-conditioned head (fusion=qa)."
        ) from err
    return MultimodalModel(encoders, head, context_encoders, passthrough, interaction)


def model_for(cfg, modalities: list[str], splits, task) -> MultimodalModel:
    """:func:`build_model` for a dataset and a task: the task's output size, the sizes the data gives the
    encoders, its context inputs, and the side targets the task reads (passed through)."""
    return build_model(
        cfg,
        modalities,
        task.output_dim(splits.num_classes),
        encoder_args=splits.encoder_args,
        context=splits.context,
        passthrough=task.target_keys,
    )
