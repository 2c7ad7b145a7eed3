"""The inference engine: a transformer stage (a contiguous layer range) computed from GGUF weights.

Owns the model configuration, dequantization and the quantized kernels (C, picked at run time), a stage's
forward pass and KV cache, sampling, the tokenizer, chat templates, one-process generation, device choice and
the synthetic GGUF models the tests and demos write. May import: `data` (the GGUF index) and the base.
"""
