"""eldric-p2p: a peer-to-peer volunteer inference network for GGUF language models.

The package is layered; a module imports only from its own layer or the layers below it
(`tests/test_layout.py` checks this):

    commands/, cli.py       the `eldric-p2p` command line
    node.py                 one node: composes every role below from a `NodeConfig`
    api/                    OpenAI-compatible gateway, router, backends, metrics, dashboard
    pipeline/               layer assignment, the planner, the coordinator, the stage worker
    net/                    peer identity, stage frames, links, discovery, the peer table, the edge relay
    engine/                 the transformer on GGUF weights: dequant, kernels, sampling, tokenizer, chat
    data/                   GGUF index, data peer, range fetcher, shard cache, reference models
    errors.py, units.py, paths.py, tasks.py, http_server.py   the base every layer may use

docs/architecture.md has the package map, a line per module, and one request's walk through it.
"""

__version__ = "0.1.0"
