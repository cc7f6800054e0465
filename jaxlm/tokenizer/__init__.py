"""Tokenizers: tiktoken encodings (bytes, GPT-2 files, BPE trained here, named encodings) with a
content hash (`tokenizer.py`), CS336-exact byte-level BPE training (`bpe.py`), and the
`jaxlm tokenizer` command (`cli.py`)."""
