"""Encoders per modality, interaction modules (mid-fusion), fusion heads, and the multimodal model."""

from onthefly.models import attention, centralnet, encoders, fusion, mmtm, sequence  # noqa: F401  (register schemas)
from onthefly.models.multimodal import MultimodalModel, build_model, model_for  # noqa: F401
