"""Export jaxlm checkpoints to Hugging Face (safetensors) and llama.cpp (GGUF); import HF weights.

params.py is the one map of jaxlm's parameter tree; compat.py decides the target architecture
and refuses what none expresses; hf.py and gguf.py write; hf_config.py maps an HF config.json to
jaxlm's sections, safetensors_read.py reads its tensors and hf_load.py places them (importer.py is
`jaxlm import`).
"""
