"""The frozen reference policy that DPO and GRPO measure the policy against: the starting weights.

Under LoRA it is the base model: the same weights with every adapter's B zeroed (x W + 0 exactly),
so no second copy of the weights exists (unless lora.trainable_tokens trains rows of the weights). Without LoRA it is a copy of the starting parameters
(`train/start.py`: train.init_from or the seeded init) in the step's `frozen["objective"]`, read
again on a resume so it never moves.
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxlm.model import lora
from jaxlm.model.build import build_model
from jaxlm.objectives.base import Objective
from jaxlm.parallel.sharding import param_shardings


class WithReference(Objective):
    """An objective that reads a frozen reference policy (`reference(model, frozen)`)."""

    @property
    def under_lora(self) -> bool:
        return bool(self.cfg.lora.rank)

    @property
    def keeps_copy(self) -> bool:
        """Whether the reference needs its own copy of the weights: not under LoRA, or under LoRA with
        trained token rows (lora.trainable_tokens), which move in the weights themselves."""
        return not self.under_lora or bool(self.cfg.lora.trainable_tokens)

    def frozen(self, mesh, rules):
        if not self.keeps_copy:
            return {}
        abstract = nnx.state(nnx.eval_shape(lambda: build_model(self.cfg, 0)))
        shardings = param_shardings(abstract, mesh, rules)
        return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                            nnx.to_pure_dict(abstract), shardings)

    def load_frozen(self, abstract, initial_params):
        return initial_params() if self.keeps_copy else {}

    def reference(self, model, frozen):
        """The reference as a model, its gradient stopped."""
        graphdef, state = nnx.split(model)
        params = frozen if self.keeps_copy else lora.without_adapters(nnx.to_pure_dict(state))
        return nnx.merge(graphdef, jax.lax.stop_gradient(params))
