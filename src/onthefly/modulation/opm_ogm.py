"""OPM and OGM together (docs/method.md §5): ρ is computed once per step by the loop and shared by both."""

from __future__ import annotations

from onthefly.config import configurable
from onthefly.modulation.base import Modulation, StepContext
from onthefly.modulation.ogm import OGM
from onthefly.modulation.opm import OPM


@configurable("modulation")
class OPMOGM(Modulation):
    needs_rho = True

    def __init__(self, opm: OPM, ogm: OGM):
        self.opm, self.ogm = opm, ogm

    def setup(self, model, num_classes: int) -> None:
        self.opm.setup(model, num_classes)
        self.ogm.setup(model, num_classes)

    def before_forward(self, ctx: StepContext) -> None:
        self.opm.before_forward(ctx)

    def on_features(self, ctx: StepContext) -> None:
        self.opm.on_features(ctx)
        self.ogm.on_features(ctx)

    def after_backward(self, ctx: StepContext) -> None:
        self.ogm.after_backward(ctx)

    def state_dict(self) -> dict:
        return {"opm": self.opm.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opm.load_state_dict(state.get("opm", {}))
