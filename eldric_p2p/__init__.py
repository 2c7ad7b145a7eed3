"""eldric-p2p: a peer-to-peer volunteer inference network for GGUF language models."""

__version__ = "0.1.0"
