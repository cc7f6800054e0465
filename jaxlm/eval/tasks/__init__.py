"""Tasks jaxlm makes itself, offline, from a seed (and a text): records as plain dicts.

  next_line.py   multiple choice: which line comes next in a text (TinyShakespeare in the README)
  arithmetic.py  `a+b=` / `a-b=` questions with exact answers (lm-eval's generate_until with
                 exact match here; as chat and preference records for sft and dpo; the same
                 problems serve reinforcement learning)
  files.py       records -> lm-eval task files (JSONL data + a YAML with `dataset_path: json`)
  cli.py         `jaxlm tasks OUT_DIR [--text FILE]`

Plain Python (no JAX, no lm-eval), so any layer may use the records.
"""
