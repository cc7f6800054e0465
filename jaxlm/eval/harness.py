"""`JaxlmLM`: a jaxlm run as a model of EleutherAI's lm-evaluation-harness.

lm-eval's TemplateLM turns (context, continuation) strings into token ids exactly as its `hf`
backend does (trailing spaces move to the continuation; an empty context becomes the prefix token,
<|endoftext|>); the rest runs on jaxlm:

  loglikelihood           Scorer (scoring.py): sorted, padded batches, each distinct context run
                          once into the KV cache (an mdlm run: the ELBO bound of elbo.py)
  loglikelihood_rolling   lm-eval's disjoint rolling windows of max_seq_len tokens, each a
                          loglikelihood request, summed per document
  generate_until          the KV-cache Decoder (inference/decode.py), batches sorted by prompt
                          length; a row ends at <|endoftext|>, max_gen_toks, or once its text holds
                          one of the task's stop sequences, and its text is cut before the first

Weights: the run's parameters, then (next) LoRA adapters merged in, then `--quantize SCHEME`; the
scorer and the decoder share that one set, placed once (`weights`).
"""

from __future__ import annotations

import json

from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from jaxlm.checkpoint.runs import Run
from jaxlm.errors import UserError
from jaxlm.eval.scoring import Scorer

MAX_GEN_TOKS = 256  # lm-eval's default when a task does not say (the hf backend's too)


def weights(run: Run, quantize: str | None = None) -> dict:
    """The parameters evaluation runs on. LoRA adapters (next) are merged in here, before
    quantization, so that every request type sees the same weights."""
    params = run.params
    if quantize is not None:
        from jaxlm.compress.quantize import quantize_params
        from jaxlm.compress.schemes import SCHEMES

        if quantize not in SCHEMES:
            raise UserError(f"--quantize {quantize}: expected one of {', '.join(SCHEMES)}")
        params = quantize_params(params, run.cfg, quantize)
    return params


class JaxlmLM(TemplateLM):
    """lm-eval's model interface over a loaded run (`jaxlm.checkpoint.runs.load_run`)."""

    def __init__(self, run: Run, batch_size: int = 32, quantize: str | None = None, elbo_samples: int = 16,
                 seed: int = 0):
        super().__init__()
        if run.tokenizer.eot_id is None:
            raise UserError(f"{run.path}: its tokenizer has no <|endoftext|>, which lm-eval needs as the prefix of "
                            "empty contexts")
        if batch_size < 1 or elbo_samples < 1:
            raise UserError(f"--batch-size {batch_size} and --elbo-samples {elbo_samples} must be >= 1")
        self.run, self.tok, self.quantize, self.seed = run, run.tokenizer, quantize, seed
        self.params = weights(run, quantize)
        self.scorer = Scorer(run.cfg, self.params, run.mesh, batch_size, elbo_samples)
        self.elbo_samples = elbo_samples

    # ------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def max_length(self) -> int:
        return self.run.cfg.model.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string, allowed_special="all")  # as the exported tokenizer.json reads it

    def tok_decode(self, tokens: list[int]) -> str:
        specials = set(self.tok.special_tokens.values())
        return self.tok.decode([t for t in tokens if t not in specials])

    def get_model_info(self) -> dict:
        """Merged into the result JSON's "config": what was evaluated, and how loglikelihood was computed."""
        cfg = self.run.cfg
        info = {"run": str(self.run.path.parent.parent), "step": self.run.step, "objective": cfg.train.objective,
                "loglikelihood": self.scorer.describe(), "quantize": self.quantize,
                "mesh": dict(self.run.mesh.shape), "batch_rows": self.scorer.batch_rows}
        if self.scorer.method == "elbo":
            info["elbo_samples"] = self.elbo_samples
        return {"jaxlm": info}

    # ------------------------------------------------------------------ requests

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        answers = self.scorer.score([(context, continuation) for _, context, continuation in requests])
        for (strings, _, _), answer in zip(requests, answers):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if self.scorer.method == "elbo":
            raise UserError(f"generate_until tasks need an autoregressive run; {self.run.path.parent.parent} is a "
                            "train.objective=mdlm run, which answers loglikelihood tasks only")
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list = [None] * len(requests)
        for indices in groups.values():
            contexts = [requests[i].args[0] for i in indices]
            for i, text in zip(indices, self._generate(contexts, requests[indices[0]].args[1])):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    # ------------------------------------------------------------------ generation

    def decoder(self):
        """The KV-cache decoder the scorer runs on (one placement of the weights for both)."""
        return self.scorer.dec

    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        """Completions of contexts that share one set of generation arguments, in their order."""
        from jaxlm.inference.decode import generate
        from jaxlm.inference.sampling import Sampling

        kwargs = normalize_gen_kwargs(gen_kwargs, MAX_GEN_TOKS)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok.decode([self.eot_token_id]))
        max_new = int(kwargs.pop("max_gen_toks"))
        room = self.max_length - max_new
        if room < 1:
            raise UserError(f"a task asks for max_gen_toks={max_new} new tokens; the model's max_seq_len="
                            f"{self.max_length} leaves no room for a prompt")
        sampling = Sampling(float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                            int(kwargs.get("top_k") or 0), float(kwargs.get("top_p") or 1.0))
        prompts = [(self.tok_encode(c) or [self.eot_token_id])[-room:] for c in contexts]
        window = 4 * max((len(s) for s in until), default=0) + 4  # tokens that can hold a stop string
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        texts: list = [None] * len(prompts)
        rows = self.scorer.batch_rows
        for start in range(0, len(order), rows):
            chunk = order[start: start + rows]
            real = len(chunk)

            def stopped(row: int, tokens: list[int]) -> bool:  # rows past `real` only fill the batch's shape
                return row >= real or any(s and s in self.tok_decode(tokens[-window:]) for s in until)

            batch = [prompts[i] for i in chunk] + [[self.eot_token_id]] * (rows - real)
            outputs = generate(self.decoder(), batch, max_new, sampling, self.seed, self.eot_token_id, until=stopped)
            for i, tokens in zip(chunk, outputs):
                texts[i] = postprocess_generated_text(self.tok_decode(tokens), until, None)
        return texts
