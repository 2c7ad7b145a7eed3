"""Federations: who may take part, proven with certificates signed by the federation's root key.

`certs` issues and checks membership certificates (X.509, Ed25519), `revocation` the signed revocation
records, `invites` the one-line invite tokens, `store` keeps a node's membership in its data dir, `httpauth`
signs HTTP requests and checks them, and `service` is the node's part: join, renew, push revocations.
May import: `net`, the base.
"""
