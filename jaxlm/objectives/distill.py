"""Distillation (`train.objective: distill`, `train.teacher: RUN_DIR`): how a draft model for
speculative decoding is made.

The student minimises, per token,

    weight * tau^2 * KL(teacher_tau || student_tau) + (1 - weight) * CE(student, next token)

where `_tau` is the softmax at temperature tau (Hinton et al.: tau^2 keeps the gradient scale of
the soft term independent of tau). The teacher is the newest valid checkpoint of its run
directory, any size, restored params-only onto the student's mesh with its own parameter
shardings under the same rules, and run in the same jitted step without gradients. Student and
teacher must share the vocabulary and tokenizer; a mismatch is refused in one line.
Evaluation is the plain next-token loss, so a distilled student compares directly with one
trained without its teacher.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import checkpoint as ckpt
from jaxlm.config import Config, ConfigError, from_dict
from jaxlm.model import kernels
from jaxlm.model.transformer import Transformer
from jaxlm.parallel.sharding import param_shardings
from jaxlm.objectives.base import forward
from jaxlm.objectives.next_token import NextToken, next_token_loss


class Distill(NextToken):
    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.step_dir = ckpt.newest_valid_step(cfg.train.teacher)
        meta = ckpt.read_meta(self.step_dir)
        self.teacher_cfg = from_dict(Config, meta.get("config", {}), prefix="teacher config: ")
        check_teacher(cfg, self.teacher_cfg, meta.get("tokenizer"), ckpt.tokenizer_identity(cfg.data.tokenizer))
        self.teacher_graphdef = None  # set by frozen(), which the trainer calls before any step

    def frozen(self, mesh, rules):
        t = self.teacher_cfg
        # how the teacher is computed: the student's kernels, already resolved for this mesh's devices
        how = {k: getattr(self.cfg.model, k) for k in (*kernels.IMPLS, "scan_layers")}
        model_cfg = dataclasses.replace(t.model, **how)
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, t.moe, nnx.Rngs(params=0))))
        shardings = param_shardings(abstract, mesh, rules)
        target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                              nnx.to_pure_dict(abstract), shardings)
        self.teacher_graphdef = graphdef
        return target

    def load_frozen(self, abstract, initial_params):
        return ckpt.restore_params(self.step_dir, abstract)

    def loss(self, model, batch, key, frozen):
        logits, aux = forward(model, batch, key)
        teacher_logits, _ = forward(nnx.merge(self.teacher_graphdef, jax.lax.stop_gradient(frozen)), batch)
        d = self.cfg.distill
        kl_sum = soft_kl_sum(jax.lax.stop_gradient(teacher_logits), logits, batch.loss_mask, d.temperature)
        ce_sum = next_token_loss(logits, batch.targets, batch.loss_mask)["ce_sum"]
        total = d.weight * d.temperature**2 * kl_sum + (1.0 - d.weight) * ce_sum
        return total, {"loss": total, "kl": kl_sum, "ce": ce_sum}, aux


def soft_kl_sum(teacher_BTV, student_BTV, mask_BT, temperature: float) -> jax.Array:
    """sum over unmasked tokens of KL(softmax(teacher / tau) || softmax(student / tau)), f32."""
    log_p = jax.nn.log_softmax(teacher_BTV.astype(jnp.float32) / temperature, axis=-1)
    log_q = jax.nn.log_softmax(student_BTV.astype(jnp.float32) / temperature, axis=-1)
    kl_BT = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return jnp.sum(kl_BT * mask_BT.astype(jnp.float32))


def check_teacher(cfg: Config, teacher: Config, teacher_tok: dict | None, student_tok: dict) -> None:
    """One line naming the mismatch if the teacher cannot teach this student."""
    where = f"train.teacher={cfg.train.teacher!r}"
    if teacher.train.objective == "mdlm" or not teacher.model.causal:
        raise ConfigError(f"{where} is a masked-diffusion (bidirectional) model; a teacher must predict the "
                          "next token (train.objective next_token or distill)")
    if teacher.model.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"{where} has model.vocab_size={teacher.model.vocab_size} but the student has "
                          f"{cfg.model.vocab_size}; teacher and student must share the vocabulary")
    t, s = teacher_tok or {"spec": teacher.data.tokenizer, "hash": None}, student_tok
    same = t["hash"] == s["hash"] if t.get("hash") and s.get("hash") else t["spec"] == s["spec"]
    if not same:
        raise ConfigError(f"{where} was trained with tokenizer {t['spec']!r} (hash {str(t.get('hash'))[:12]}) but "
                          f"data.tokenizer={s['spec']!r} (hash {str(s.get('hash'))[:12]}); they must be the same")
