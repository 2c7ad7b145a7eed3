"""The node's part in its federation: answer joins and renewals, spread revocations, renew its certificate.

    POST /api/v1/federation/join         {invite, proof, public_key, name}  (open: the invite is the key)
                                         -> {federation, name, root, chain, revocations, issuer}
    POST /api/v1/federation/renew        (member) -> {chain}: a fresh certificate with the caller's roles
    GET  /api/v1/federation              (member) this node's membership: federation id, roles, expiry
    GET  /api/v1/federation/revocations  (member) every revocation record this node knows
    POST /api/v1/federation/revocations  (member) [record, ...]: new valid ones are kept and passed on

Revocations spread by push: a record this node learns (from the CLI writing revoked.json, or from a peer)
is posted at once to every peer it knows, which keep and pass on only what is new to them, so a revocation
reaches every member within one round trip per hop; a pull from one peer every `PULL_S` repairs what a
push missed. On each new record every open link to that peer is closed (`Link.abort`), and the relay (its
own `on_revoked` hook) drops its registration.

`join_federation(token, identity, data_dir)` is the joiner's side (used by `eldric-p2p federation join`): it
reaches the inviter directly at the token's addresses or, failing that, through the token's relays as a
guest that may talk to the inviter only.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from eldric_p2p.errors import EldricError, PeerUnavailable, UsageError
from eldric_p2p.http_server import error_response
from eldric_p2p.net.federation.certs import Federation, MemberCert, MembershipError
from eldric_p2p.net.federation.invites import Invite, redeem
from eldric_p2p.net.federation.revocation import Revocation, parse_records
from eldric_p2p.net.federation.store import Membership, read_json, write_private
from eldric_p2p.net.identity import Identity, peer_id_of
from eldric_p2p.tasks import open_nursery

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024
PULL_S = 30.0
WATCH_S = 1.0
RENEW_CHECK_S = 60.0
PUSH_TIMEOUT_S = 5.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def _json(request: Request) -> Any:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise UsageError(f"request body over {MAX_BODY // 1024} KiB")
    try:
        return json.loads(raw or b"null")
    except ValueError as exc:
        raise UsageError(f"request body is not JSON: {exc}") from exc


def _refused(exc: EldricError) -> Response:
    if isinstance(exc, MembershipError):
        return error_response(
            401 if exc.code != "invite_used" else 403, str(exc), "authentication_error", exc.code
        )
    if isinstance(exc, UsageError):
        return error_response(422, str(exc), "invalid_request_error", "invalid_request")
    return error_response(502, str(exc), "peer_error", "peer_unavailable")


class FederationService:
    """Background work and routes of a node's membership. `await nursery.start(service.run)`."""

    def __init__(
        self,
        identity: Identity,
        *,
        peer_urls: Callable[[], list[str]] = list,
        client_factory: Callable[..., httpx.AsyncClient] = httpx.AsyncClient,
    ) -> None:
        assert identity.membership is not None
        self.identity = identity
        self.membership: Membership = identity.membership
        self.peer_urls = peer_urls
        self.client_factory = client_factory
        self._nursery: trio.Nursery | None = None
        self.stats = {"joined": 0, "renewed": 0, "pushed": 0, "links_closed": 0}
        self.membership.on_revoked.append(self._revoked)

    # ---- revocation ---------------------------------------------------------------------------------------

    def _revoked(self, peer_id: str) -> None:
        if self._nursery is None:
            return
        for link in list(self.membership.links):
            if link.peer_id == peer_id:
                self.membership.links.discard(link)
                self.stats["links_closed"] += 1
                self._nursery.start_soon(link.abort)
        record = self.membership.revocations.get(peer_id)
        if record is not None:
            self._nursery.start_soon(self._push, [record])

    async def _push(self, records: list[Revocation]) -> None:
        body = [r.to_json() for r in records]
        async with self.client_factory(timeout=PUSH_TIMEOUT_S) as client, open_nursery() as nursery:
            for url in self.peer_urls():
                nursery.start_soon(self._post_quietly, client, f"{url}/api/v1/federation/revocations", body)

    async def _post_quietly(self, client: httpx.AsyncClient, url: str, body: Any) -> None:
        try:
            with trio.move_on_after(PUSH_TIMEOUT_S):
                resp = await client.post(url, json=body)
                if resp.status_code == 200:
                    self.stats["pushed"] += 1
        except httpx.HTTPError as exc:
            log.debug("revocation push to %s failed: %s", url, exc)

    async def _pull(self) -> None:
        async with self.client_factory(timeout=PUSH_TIMEOUT_S) as client:
            for url in self.peer_urls()[:3]:
                try:
                    resp = await client.get(f"{url}/api/v1/federation/revocations")
                    if resp.status_code == 200:
                        self.membership.add_revocations(parse_records(resp.json().get("revocations")))
                except (httpx.HTTPError, ValueError, AttributeError, MembershipError) as exc:
                    log.debug("revocation pull from %s failed: %s", url, exc)

    # ---- renewal ------------------------------------------------------------------------------------------

    def _needs_renewal(self, now: float) -> bool:
        cert = self.membership.cert
        return cert is not None and now > cert.not_before + (cert.not_after - cert.not_before) / 2

    async def renew(self) -> bool:
        """Get a fresh certificate: from our own root key, else from the node that issued ours."""
        m = self.membership
        if m.cert is None or m.federation is None:
            return False
        if m.root_key() is not None:
            m.save(m.federation.root_pem(), m.issuer().issue(self.identity.public_key, m.cert.roles))
            self.stats["renewed"] += 1
            return True
        info = read_json(m.dir / "issuer.json", {})
        urls = [u for u in info.get("urls", []) if isinstance(u, str)] if isinstance(info, dict) else []
        async with self.client_factory(timeout=10.0) as client:
            for url in urls:
                try:
                    resp = await client.post(f"{url}/api/v1/federation/renew", json={})
                    if resp.status_code != 200:
                        log.info("renewal at %s refused: %s", url, resp.text[:300])
                        continue
                    chain = tuple(_unb64(c) for c in resp.json()["chain"])
                    m.save(m.federation.root_pem(), chain)
                except (httpx.HTTPError, ValueError, KeyError, TypeError, MembershipError) as exc:
                    log.info("renewal at %s failed: %s", url, exc)
                    continue
                self.stats["renewed"] += 1
                log.info("membership renewed until %s", time.ctime(m.cert.not_after if m.cert else 0))
                return True
        return False

    # ---- running ------------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            last_pull = last_renew = trio.current_time()
            while True:
                await trio.sleep(WATCH_S)
                try:
                    self.membership.reload()  # the CLI wrote (join, revoke, renew): pick it up
                except UsageError as exc:
                    log.warning("federation files: %s", exc)
                now = trio.current_time()
                if not self.membership.active:
                    continue
                if now - last_pull >= PULL_S:
                    last_pull = now
                    nursery.start_soon(self._pull)
                if now - last_renew >= RENEW_CHECK_S and self._needs_renewal(time.time()):
                    last_renew = now
                    nursery.start_soon(self.renew)

    # ---- routes -------------------------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        m = self.membership

        async def join(request: Request) -> Response:
            try:
                body = await _json(request)
                if not isinstance(body, dict):
                    raise UsageError("join body must be a JSON object")
                invite_id, proof, key, name = (body.get(k) for k in ("invite", "proof", "public_key", "name"))
                if not isinstance(invite_id, str) or not isinstance(proof, str) or not isinstance(key, str):
                    raise UsageError("join needs invite, proof and public_key")
                try:
                    public_key = bytes.fromhex(key)
                    joiner = peer_id_of(public_key)
                except (ValueError, EldricError) as exc:
                    raise UsageError("public_key must be 64 hex characters (an Ed25519 key)") from exc
                if not m.active or m.federation is None:
                    raise MembershipError("not_member", "this node is in no federation")
                issuer = m.issuer()
                admin = redeem(m, invite_id, proof, joiner)
                chain = issuer.issue(public_key, ("member", "admin") if admin else ("member",))
                cert = m.federation.verify(chain, peer_id=joiner)
            except EldricError as exc:
                return _refused(exc)
            label = name if isinstance(name, str) else ""
            m.record_issued(cert, label)
            self.stats["joined"] += 1
            log.info(
                "%s (%s) joined federation %s%s", joiner, label[:64], m.id, " as an admin" if admin else ""
            )
            return JSONResponse(
                {
                    "federation": m.id,
                    "name": m.federation.name,
                    "root": m.federation.root_pem().decode(),
                    "chain": [_b64(c) for c in chain],
                    "revocations": [r.to_json() for r in m.revocations.values()],
                    "issuer": self.identity.peer_id,
                }
            )

        async def renew(request: Request) -> Response:
            caller: MemberCert | None = request.scope.get("eldric.member")
            if caller is None or m.federation is None:
                return error_response(401, "renewal needs a member's signed request", "authentication_error",
                                      "missing_credential")  # fmt: skip
            try:
                issuer = m.issuer()
                from eldric_p2p.net.federation.certs import load_der, raw_public_key

                key = raw_public_key(load_der(caller.chain[0]))
                roles = caller.roles if issuer.is_root else caller.roles - {"admin"}
                chain = issuer.issue(key, roles)
                cert = m.federation.verify(chain, peer_id=caller.peer_id)
            except EldricError as exc:
                return _refused(exc)
            m.record_issued(cert, m.issued().get(caller.peer_id, {}).get("name", ""))
            self.stats["renewed"] += 1
            return JSONResponse({"chain": [_b64(c) for c in chain]})

        async def status(request: Request) -> Response:
            return JSONResponse(m.status())

        async def list_revocations(request: Request) -> Response:
            return JSONResponse({"revocations": [r.to_json() for r in m.revocations.values()]})

        async def push_revocations(request: Request) -> Response:
            try:
                records = parse_records(await _json(request))
            except EldricError as exc:
                return _refused(exc)
            new = m.add_revocations(records)
            return JSONResponse({"new": new})

        return [
            Route("/api/v1/federation/join", join, methods=["POST"]),
            Route("/api/v1/federation/renew", renew, methods=["POST"]),
            Route("/api/v1/federation", status, methods=["GET"]),
            Route("/api/v1/federation/revocations", list_revocations, methods=["GET"]),
            Route("/api/v1/federation/revocations", push_revocations, methods=["POST"]),
        ]


# --------------------------------------------------------------------------- the joiner's side


async def join_federation(
    token: str,
    identity: Identity,
    data_dir: str | Path,
    *,
    name: str = "",
    timeout: float = 30.0,  # noqa: ASYNC109 (the whole join, direct tries and relays together)
) -> Membership:
    """Redeem `token` at its inviter and keep the membership in `data_dir`. Raises MembershipError (the
    token or the answer is bad), PeerUnavailable (no address or relay reached the inviter), UsageError."""
    invite = Invite.from_token(token)
    if time.time() > invite.expires:
        raise MembershipError("expired", "this invite token expired")
    membership = Membership(data_dir, identity)
    if membership.active:
        if membership.id == invite.federation_id:
            raise UsageError(f"this node is already a member of federation {membership.id}")
        raise UsageError(f"this node is already a member of another federation ({membership.id})")
    body = {"invite": invite.invite_id, "proof": invite.proof(identity.peer_id),
            "public_key": identity.public_key.hex(), "name": name}  # fmt: skip
    errors: list[str] = []
    answer: Any = None
    with trio.move_on_after(timeout):
        answer = await _post_direct(invite, body, errors)
        if answer is None:
            answer = await _post_relayed(invite, identity, body, errors)
    if answer is None:
        raise PeerUnavailable(
            f"could not reach the inviter {invite.inviter}: {'; '.join(errors) or 'timed out'}"
        )
    if isinstance(answer, dict) and "error" in answer:
        err = answer["error"] if isinstance(answer["error"], dict) else {}
        raise MembershipError(
            str(err.get("code", "refused")), f"the inviter refused: {err.get('message', answer)}"
        )
    try:
        root = str(answer["root"]).encode()
        chain = tuple(_unb64(c) for c in answer["chain"])
        records = parse_records(answer.get("revocations", []))
    except (KeyError, TypeError, ValueError) as exc:
        raise MembershipError("malformed", f"the inviter's answer is not a membership: {exc}") from exc
    if Federation.from_pem(root).id != invite.federation_id:
        raise MembershipError("other_federation", "the inviter answered with another federation's root")
    membership.save(root, chain)
    membership.add_revocations(records)
    urls = [f"http://{a}" for a in invite.addresses]
    from eldric_p2p.net.connector import peer_url

    urls.append(peer_url(invite.inviter, _port_of(invite)))
    write_private(
        membership.dir / "issuer.json", json.dumps({"peer_id": invite.inviter, "urls": urls}).encode()
    )
    return membership


def _port_of(invite: Invite) -> int:
    for a in invite.addresses:
        port = a.rsplit(":", 1)[-1]
        if port.isdigit():
            return int(port)
    return 8470


async def _post_direct(invite: Invite, body: dict[str, Any], errors: list[str]) -> Any:
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
        for address in invite.addresses:
            url = f"http://{address}/api/v1/federation/join"
            try:
                resp = await client.post(url, json=body)
                return resp.json()
            except (httpx.HTTPError, ValueError) as exc:
                errors.append(f"{address}: {exc or type(exc).__name__}")
    return None


async def _post_relayed(invite: Invite, identity: Identity, body: dict[str, Any], errors: list[str]) -> Any:
    """Register at each relay of the token as a guest (its ticket) and post the join over a link to the
    inviter; the link's TLS keeps the proof away from the relay operator."""
    from eldric_p2p.net.connector import Connector, http_client_factory, peer_url
    from eldric_p2p.net.discovery import PeerTable
    from eldric_p2p.net.relay.client import RelayMember

    for relay in invite.relays:
        host, _, port = relay.rpartition(":")
        if not port.isdigit():
            errors.append(f"relay {relay!r}: not HOST:PORT")
            continue
        table = PeerTable(identity.peer_id)
        connector = Connector(identity, table)
        connector.ticket = invite.ticket.to_text()
        member = RelayMember(identity, host.strip("[]"), int(port), table, dict, connector.handle_relayed,
                             ticket=connector.ticket)  # fmt: skip
        connector.members.append(member)
        try:
            async with open_nursery() as nursery:
                await nursery.start(member.run)
                with trio.move_on_after(10):
                    await member.wait_registered()
                if not member.registered:
                    errors.append(f"relay {relay}: could not register ({member.last_error or 'timed out'})")
                    nursery.cancel_scope.cancel()
                    continue
                try:
                    async with http_client_factory(connector)(timeout=10.0) as client:
                        resp = await client.post(
                            f"{peer_url(invite.inviter, _port_of(invite))}/api/v1/federation/join", json=body
                        )
                        return resp.json()
                except (httpx.HTTPError, ValueError) as exc:
                    errors.append(f"relay {relay}: {exc or type(exc).__name__}")
                finally:
                    nursery.cancel_scope.cancel()
        except EldricError as exc:
            errors.append(f"relay {relay}: {exc}")
    return None
