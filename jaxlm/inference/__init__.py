"""Inference: KV-cache decoding, sampling, speculative decoding, quantized weights
(jaxlm/compress), `jaxlm generate` and `jaxlm eval`.

  cache.py        the preallocated KV cache, one per layer, stacked like the scanned parameters
  decode.py       the Decoder (jitted prefill and steps over the cache) and `generate`
  sampling.py     greedy, temperature, top-k and top-p, seeded
  speculative.py  draft-then-verify decoding with the exact modified rejection sampling
  budget.py       budget forcing: the stop token masked, an answer cue forced, in the jitted step
  diffusion.py    masked-diffusion samplers (MDLM, LLaDA remasking, block diffusion)
  prompts.py      what generate continues: plain prompts, or chat turns rendered as SFT renders them
  report.py       how every generator prints (the text alone, ending with a newline; stats on stderr)
  cli_generate.py `jaxlm generate`, dispatched by the checkpoint's train.objective
  cli_eval.py     `jaxlm eval --data`: loss, perplexity and bits per byte as JSON (the verb lives in
                  jaxlm/eval/cli.py, with lm-eval tasks)

Batches of prompts are right-padded: row b's prompt sits at positions 0..L_b-1 and its cache
slot s holds position s, so each row decodes at its own position (the attention mask compares
key slots with each row's query positions) and sees no padding.
"""
