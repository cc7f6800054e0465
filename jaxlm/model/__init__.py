"""The transformer LM and its parts.

Tensor names carry their shape (`x_BTD`, `w_DF`), and einsum strings use the same letters; one
letter means one thing across files:

  B batch rows          T query positions      S key/value positions (= T in training)
  D d_model             F feed-forward hidden   V vocabulary
  H query heads         K kv heads              G query heads per kv head (H / K)
  d head dim            E experts               C expert capacity (tokens per expert)
  N flattened tokens    M rows in a buffer      P devices along the expert axis
  R LoRA rank           J prompts (GRPO groups)  O completions per prompt (GRPO's G)

`transformer.py` is the model, `attention.py`/`layers.py`/`moe.py` its parts, `ops.py` what both they
and the kernels use, `build.py` the one way a config becomes a model, and `kernels/`
the backend-specific kernels they call (the seam where CPU, GPU and TPU differ).
"""
