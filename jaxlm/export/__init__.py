"""Export jaxlm checkpoints to Hugging Face (safetensors) and llama.cpp (GGUF); import HF weights.

params.py is the one map of jaxlm's parameter tree; compat.py decides the target architecture
and refuses what none expresses; hf.py and gguf.py write; hf_load.py reads HF back in (importer.py is
`jaxlm import`).
"""
