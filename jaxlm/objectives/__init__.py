"""Training objectives, chosen by `train.objective` and handed to the pure train step.

Add one by subclassing `base.Objective` in a module of its own and naming it in `OBJECTIVES`;
the step never branches on which one it has.
"""

from __future__ import annotations

from jaxlm.config import Config
from jaxlm.objectives.base import Objective, forward, moe_loss
from jaxlm.objectives.distill import Distill
from jaxlm.objectives.dpo import DPO
from jaxlm.objectives.grpo import GRPO
from jaxlm.objectives.mdlm import MDLM
from jaxlm.objectives.next_token import NextToken, next_token_loss
from jaxlm.objectives.sft import SFT

OBJECTIVES: dict[str, type[Objective]] = {"next_token": NextToken, "mdlm": MDLM, "distill": Distill, "sft": SFT,
                                          "dpo": DPO, "grpo": GRPO}


def make_objective(cfg: Config) -> Objective:
    return OBJECTIVES[cfg.train.objective](cfg)


__all__ = ["OBJECTIVES", "DPO", "GRPO", "MDLM", "SFT", "Distill", "NextToken", "Objective", "forward", "make_objective", "moe_loss",
           "next_token_loss"]
