"""Log-likelihoods of continuations on jaxlm's own model, batched on a mesh.

A request is (context ids, continuation ids); its answer is (log p(continuation | context),
whether greedy decoding would produce the continuation). Requests run in batches of a fixed
number of rows (a multiple of the data-parallel size, rows sharded over it), longest first,
right-padded to a few length buckets, so a whole task compiles a handful of programs; only
per-row sums leave the device, and every batch is queued before the first is read.

Next-token runs score exactly, each distinct context once over the KV cache (contexts.py).
Masked diffusion runs (train.objective=mdlm) score the ELBO bound of elbo.py over whole rows.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxlm.config import Config
from jaxlm.errors import UserError
from jaxlm.eval import contexts, elbo
from jaxlm.eval.rows import Row, digest, elbo_row, length_bucket, next_token_row
from jaxlm.inference.decode import Decoder
from jaxlm.parallel.mesh import data_parallel_size
from jaxlm.parallel.sharding import spec_for

ROW_AXES = ("batch", "length")
# train.objective -> how its checkpoints answer loglikelihood
METHODS = {"next_token": "exact", "distill": "exact", "mdlm": "elbo"}


class Scorer:
    """A run's model placed on a mesh (the decoder's placement), answering loglikelihood requests."""

    def __init__(self, cfg: Config, params: dict, mesh: Mesh, batch_rows: int = 32, elbo_samples: int = 16):
        objective = cfg.train.objective
        if objective not in METHODS:
            raise UserError(f"train.objective={objective!r} runs have no log-likelihood here; known: "
                            f"{', '.join(METHODS)}")
        self.method = METHODS[objective]
        self.dec = Decoder(cfg, params, mesh)  # kernels resolved, dropless MoE, parameters placed by the rules
        self.params, self.mesh, self.rules = self.dec.params, mesh, self.dec.rules
        self.max_len = self.dec.max_seq_len
        dp = data_parallel_size(mesh, self.rules)
        self.batch_rows = -(-max(1, batch_rows) // dp) * dp
        if self.method == "elbo":
            self.elbo_fn = jax.jit(elbo.scores(self.dec.graphdef, mesh, self.rules, self.dec.cfg, elbo_samples,
                                               self.max_len))
        else:
            self.block_fn = jax.jit(lambda *a: contexts.block_scores(self.dec, *a))

    def describe(self) -> str:
        return {"exact": "exact: the sum of next-token log-probabilities",
                "elbo": "a lower bound: the MDLM ELBO of the continuation given the clean context, Monte Carlo "
                        "over the number of masked tokens (LLaDA's estimator)"}[self.method]

    def put(self, a: np.ndarray) -> jax.Array:
        """A host array onto the mesh, its first (batch) dimension over the data axes."""
        spec = spec_for(a.shape, ROW_AXES[: a.ndim], self.mesh, self.rules)
        return jax.device_put(a, NamedSharding(self.mesh, spec))

    def score(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log-likelihood, is greedy) per (context, continuation), in the order given."""
        for context, continuation in requests:
            if not continuation or len(continuation) > self.max_len or not context:
                raise UserError(f"a loglikelihood request has {len(context)} context and {len(continuation)} "
                                f"continuation tokens; expected a context and 1..max_seq_len={self.max_len} "
                                "continuation tokens")
        if self.method == "elbo":
            queued = self.queue_whole_rows([elbo_row(c, x, self.max_len) for c, x in requests])
        else:
            queued = contexts.score(self, [next_token_row(c, x, self.max_len) for c, x in requests])
        out: list = [None] * len(requests)
        for indices, (logp_B, greedy_B) in queued:
            logp_B, greedy_B = np.asarray(logp_B), np.asarray(greedy_B)
            for j, i in enumerate(indices):
                out[i] = (float(logp_B[j]), bool(greedy_B[j]))
        return out

    def queue_whole_rows(self, rows: list[Row]) -> list:
        """Batches of whole rows, longest first: [(request indices, device results)]."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i].inputs))
        chunks = (order[s: s + self.batch_rows] for s in range(0, len(order), self.batch_rows))
        return [(chunk, self.elbo_fn(self.params, *self.whole_rows([rows[i] for i in chunk]))) for chunk in chunks]

    def whole_rows(self, rows: list[Row]) -> tuple:
        """[B, T] inputs, targets and scored mask (padding rows score nothing), [B] lengths and
        digests, placed."""
        B, T = self.batch_rows, length_bucket(max(len(r.inputs) for r in rows), self.max_len)
        inputs, targets = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
        scored, lengths, digests = np.zeros((B, T), bool), np.ones(B, np.int32), np.zeros(B, np.uint32)
        for b, r in enumerate(rows):
            n = lengths[b] = len(r.inputs)
            inputs[b, :n], targets[b, :n], scored[b, n - r.scored: n] = r.inputs, r.targets, True
            digests[b] = digest(r.inputs)
        return tuple(map(self.put, (inputs, targets, scored, lengths, digests)))
