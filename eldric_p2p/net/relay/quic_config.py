"""QUIC settings for the relay: ALPN, datagram size, flow-control windows, and the throwaway TLS certificate.

TLS uses a self-signed certificate made per server and unchecked by clients: the relay protocol (REGISTER's
CHALLENGE) and the end-to-end link handshake authenticate peers, not QUIC.
"""

from __future__ import annotations

import datetime
import ssl
from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ALPN = "eldric-relay/1"
DEFAULT_DATAGRAM_SIZE = 1350  # fits a 1500-byte path MTU with IPv6 headers to spare
DEFAULT_STREAM_WINDOW = 256 * 1024


def _self_signed() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "eldric-relay")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _configuration(
    *, is_client: bool, idle_timeout: float, max_datagram_size: int, stream_window: int, **extra: Any
) -> QuicConfiguration:
    """The settings both ends share: our ALPN, `stream_window` per stream, 64 windows per connection."""
    return QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        idle_timeout=idle_timeout,
        max_datagram_size=max_datagram_size,
        max_stream_data=stream_window,
        max_data=64 * stream_window,
        **extra,
    )


def server_configuration(
    *,
    idle_timeout: float = 30.0,
    max_datagram_size: int = DEFAULT_DATAGRAM_SIZE,
    stream_window: int = DEFAULT_STREAM_WINDOW,
) -> QuicConfiguration:
    """QUIC server settings with a fresh self-signed certificate."""
    config = _configuration(
        is_client=False,
        idle_timeout=idle_timeout,
        max_datagram_size=max_datagram_size,
        stream_window=stream_window,
    )
    config.certificate, config.private_key = _self_signed()
    return config


def client_configuration(
    *,
    idle_timeout: float = 30.0,
    max_datagram_size: int = DEFAULT_DATAGRAM_SIZE,
    stream_window: int = DEFAULT_STREAM_WINDOW,
) -> QuicConfiguration:
    """QUIC client settings; the certificate is not checked (REGISTER's CHALLENGE proves the relay's key)."""
    return _configuration(
        is_client=True,
        idle_timeout=idle_timeout,
        max_datagram_size=max_datagram_size,
        stream_window=stream_window,
        verify_mode=ssl.CERT_NONE,
        server_name="eldric-relay",
    )
