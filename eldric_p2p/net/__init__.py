"""The peer network: who a peer is, how to reach it, and the byte streams between peers.

Owns peer identity (Ed25519 keys, peer ids), the stage frame format, authenticated links (TLS bound to peer
ids), the connector (direct, or through the relay), LAN discovery (zeroconf bridged into trio), the peer table
and directory, and the edge relay (`net.relay`: QUIC driven from trio). May import: `data`, `engine`, the
base.
"""
