"""Inference: KV-cache decoding, sampling, speculative decoding, quantized weights
(jaxlm/compress), `jaxlm generate` and `jaxlm eval`.

  load.py         a run directory's newest (or chosen) checkpoint: config, parameters, tokenizer
  cache.py        the preallocated KV cache, one per layer, stacked like the scanned parameters
  decode.py       the Decoder (jitted prefill and steps over the cache) and `generate`
  sampling.py     greedy, temperature, top-k and top-p, seeded
  speculative.py  draft-then-verify decoding with the exact modified rejection sampling
  cli_generate.py `jaxlm generate`, dispatched by the checkpoint's train.objective
  cli_eval.py     `jaxlm eval`: loss, perplexity and bits per byte as JSON

Batches of prompts are right-padded: row b's prompt sits at positions 0..L_b-1 and its cache
slot s holds position s, so each row decodes at its own position (the attention mask compares
key slots with each row's query positions) and sees no padding.
"""
