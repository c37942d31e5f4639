"""Encoders per modality, fusion heads, and the multimodal model."""
from onthefly.models import encoders, fusion, sequence  # noqa: F401  (register schemas)
from onthefly.models.multimodal import MultimodalModel, build_model, model_for  # noqa: F401
