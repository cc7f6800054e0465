"""Compression: making a trained model smaller (the model layer's weights, read by inference and train).

  schemes.py   quantization schemes: symmetric and asymmetric uniform (int8, int4 group-wise, as
               llama.cpp's Q4_0 / Q4_1) and logarithmic (power-of-two levels), encode and levels
  quantize.py  QuantizedWeight (codes + group scales, dequantized inside `kernels.project`),
               quantize_params / dequantize_params, weight_bytes
  prune.py     unstructured pruning: magnitude (per layer or global) and N:M masks, the cubic
               schedule of gradual pruning (the masks live in training's `frozen`: train/pruning.py)
  structured.py  structured pruning: FFN channels or attention heads (kv groups) cut by their norm,
               giving a smaller model config (`jaxlm prune`, tools/prune.py)
"""
