"""Reading the fields of an untrusted relay message body (a decoded JSON object), and socket-address text.

Every reader checks type, length and range and raises `RemoteProtocolError` naming the field; protocol.py
builds its messages from these.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from eldric_p2p.errors import RemoteProtocolError
from eldric_p2p.net.identity import is_peer_id

MAX_STRING = 512
MAX_CREDENTIAL = 6144  # characters of a REGISTER cert (a chain of 2 certificates) or ticket, base64url text
CREDENTIAL_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
MAX_ADDRESS = 64  # characters of "ip:port" / "[ipv6]:port"

SocketAddress = tuple[str, int]


def field(body: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in body:
        raise RemoteProtocolError(f"relay message lacks field {key!r}")
    value = body[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RemoteProtocolError(f"relay message field {key!r} has the wrong type")
    return value


def string(body: dict[str, Any], key: str, max_len: int = MAX_STRING) -> str:
    value: str = field(body, key, str)
    if len(value) > max_len:
        raise RemoteProtocolError(f"relay message field {key!r} is {len(value)} characters, limit {max_len}")
    return value


def peer_id(body: dict[str, Any], key: str) -> str:
    value = string(body, key, 64)
    if not is_peer_id(value):
        raise RemoteProtocolError(f"relay message field {key!r} is not a peer id")
    return value


def hex_bytes(body: dict[str, Any], key: str, length: int) -> bytes:
    text = string(body, key, 2 * length)
    try:
        value = bytes.fromhex(text)
    except ValueError as exc:
        raise RemoteProtocolError(f"relay message field {key!r} is not hex") from exc
    if len(value) != length:
        raise RemoteProtocolError(f"relay message field {key!r} must be {length} bytes, got {len(value)}")
    return value


def credential(body: dict[str, Any], key: str) -> str | None:
    """An optional REGISTER credential: non-empty base64url (and '.') text within MAX_CREDENTIAL."""
    if key not in body:
        return None
    value = string(body, key, MAX_CREDENTIAL)
    if not value or value.strip(CREDENTIAL_CHARS):
        raise RemoteProtocolError(f"relay message field {key!r} is not base64url text")
    return value


def uint(body: dict[str, Any], key: str) -> int:
    value: int = field(body, key, int)
    if not 0 <= value < 2**63:
        raise RemoteProtocolError(f"relay message field {key!r} out of range")
    return value


def names(body: dict[str, Any], key: str, max_items: int, max_len: int = 32) -> tuple[str, ...]:
    """An optional list of short strings (absent: empty)."""
    if key not in body:
        return ()
    value = field(body, key, list)
    if len(value) > max_items or not all(isinstance(x, str) and 0 < len(x) <= max_len for x in value):
        raise RemoteProtocolError(f"relay message field {key!r} is not a list of at most {max_items} names")
    return tuple(value)


def format_address(addr: SocketAddress | tuple[Any, ...]) -> str:
    """("10.0.0.1", 4433) -> "10.0.0.1:4433"; an IPv6 host goes in brackets."""
    host, port = str(addr[0]), int(addr[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address_untrusted(text: str) -> SocketAddress:
    """"ip:port" or "[ipv6]:port" (an IP literal, never a name) -> (host, port) in canonical form.

    Raises RemoteProtocolError for anything else (names, port 0, out of range, over MAX_ADDRESS characters).
    """
    if len(text) > MAX_ADDRESS:
        raise RemoteProtocolError(f"address is {len(text)} characters, limit {MAX_ADDRESS}")
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise RemoteProtocolError(f"IPv6 address without brackets: {text!r}")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise RemoteProtocolError(f"address {text!r} has no valid port")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise RemoteProtocolError(f"address {text!r} is not an IP literal") from exc
    return str(ip), int(port_text)


def addresses(body: dict[str, Any], key: str, max_items: int) -> tuple[str, ...]:
    """An optional list of at most `max_items` socket addresses (absent: empty), canonical and distinct."""
    if key not in body:
        return ()
    value = field(body, key, list)
    if len(value) > max_items:
        raise RemoteProtocolError(f"field {key!r} has {len(value)} addresses, limit {max_items}")
    out: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise RemoteProtocolError(f"relay message field {key!r} holds something that is not text")
        text = format_address(parse_address_untrusted(item))
        if text not in out:
            out.append(text)
    return tuple(out)
