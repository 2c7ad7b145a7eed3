"""The edge relay: a public rendezvous that members reach with outbound QUIC only, so peers behind NAT meet.

`quic` drives one aioquic sans-IO connection from trio, `quic_udp` puts connections on UDP sockets,
`quic_config` holds the QUIC settings and certificate; `protocol` (messages), `control` (the control stream's
state machines) and `framing` are the relay's protocol; `server` is the relay, `client` a member's
registration and relayed streams. May import: `net`, the base.
"""
