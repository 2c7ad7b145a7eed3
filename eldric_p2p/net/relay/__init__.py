"""The edge relay: a public rendezvous that members reach with outbound QUIC only, so peers behind NAT meet.

`quic` drives aioquic's sans-IO connection from trio, `protocol` and `framing` are the relay's messages,
`server` is the relay, `client` a member's registration and relayed streams. May import: `net`, the base.
"""
