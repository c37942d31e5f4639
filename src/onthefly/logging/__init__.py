"""Where metrics go: one W&B run per job plus local CSV/JSON copies (no W&B sync needed to read them)."""

from onthefly.logging.sinks import RunLogger  # noqa: F401
