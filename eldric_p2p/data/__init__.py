"""The data plane: GGUF files, where their bytes live, and how a worker gets only the bytes it needs.

Owns the GGUF header index, the data peer (serving tensor tables and byte ranges of local files), the range
fetcher (HTTP/1.1 Range requests over any stream, planning, resume, hashing), the on-disk shard cache and the
reference models assembled from PyPI. May import: the base (`errors`, `units`, `paths`, `http_server`).
"""
