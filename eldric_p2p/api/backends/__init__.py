"""Backends: whatever generates tokens for the gateway, behind one protocol (`base.Backend`).

`local` runs the engine in this process, `pipeline` is the head of a multi-worker pipeline (and its remote
form), `upstream` forwards to another OpenAI-compatible server. May import: `pipeline`, `net`, `engine`,
`data`, the base.
"""
