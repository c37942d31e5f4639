"""onthefly: on-the-fly modulation (OPM, OGM, OGM-GE) for balanced multimodal learning."""

__version__ = "0.1.0"
