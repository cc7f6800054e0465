"""Downstream evaluation: a jaxlm run as a model of EleutherAI's lm-evaluation-harness.

  rows.py       how a loglikelihood request becomes a model row; length buckets
  scoring.py    the Scorer: sorted, padded, sharded batches -> (log p, greedy) per request
  contexts.py   next-token scoring with each distinct context run once into the KV cache
  elbo.py       masked diffusion runs: the MDLM ELBO bound as their log-likelihood
  harness.py    JaxlmLM, lm-eval's model interface (loglikelihood, rolling, generate_until)
  registry.py   task names and local task files -> lm-eval tasks, failures as one-line errors
  cli.py        `jaxlm eval RUN --data PATH | --tasks NAMES`
  tasks/        task records jaxlm makes itself (next-line choice from a text, arithmetic) and
                `jaxlm tasks`, which writes them as lm-eval task files

Everything but tasks/ needs the `eval` extra (lm-eval); tasks/ is plain Python, below the rest.
"""
