"""A federation of in-process nodes on loopback, built with the functions behind `eldric-p2p federation`.

n0 runs `federation init` and serves the model; n1 and n2 join with invites n0 printed; then a deploy over
the three and a greedy chat equal to one process. A stranger (own identity, pointed at n0) is refused on
every path, and a revoked member's links close within seconds while the federation keeps serving.
"""

from __future__ import annotations

import argparse
import io
import time
from contextlib import redirect_stdout
from pathlib import Path

import httpx
import pytest
import trio
from pipeline.test_pipeline import MODEL, MiB, _start, deploy, generate, joined, local_answer, model_dir  # noqa: F401

from eldric_p2p.commands import federation as fed_cli
from eldric_p2p.engine.generate import LocalModel
from eldric_p2p.engine.sampling import SamplingParams
from eldric_p2p.errors import AuthenticationError
from eldric_p2p.net.federation.httpauth import SignedAuth
from eldric_p2p.net.federation.service import join_federation
from eldric_p2p.net.federation.store import Membership
from eldric_p2p.net.identity import Identity
from eldric_p2p.net.links import open_tcp_link
from eldric_p2p.node import NodeConfig


def cli(*argv: str) -> str:
    """Run `eldric-p2p federation ...` in this process; its stdout."""
    parser = argparse.ArgumentParser()
    fed_cli.add_parser(parser.add_subparsers(dest="command"))
    out = io.StringIO()
    with redirect_stdout(out):
        assert fed_cli.main(parser.parse_args(["federation", *argv])) == 0
    return out.getvalue()


def signer(data_dir: Path) -> SignedAuth:
    ident = Identity.load_or_create(data_dir)
    return SignedAuth(ident.with_membership(Membership(data_dir, ident)))


def node_config(tmp: Path, name: str, *, models: list[Path] = (), peers=(), memory=300 * MiB) -> NodeConfig:  # type: ignore[assignment]
    return NodeConfig(name=name, data_dir=tmp / name, listen_port=0, models=list(models), memory=memory,
                      mdns=False, peers=list(peers), peer_interval=0.2)  # fmt: skip


@pytest.fixture(scope="module")
def local(model_dir: Path) -> LocalModel:  # noqa: F811
    return LocalModel(model_dir / f"{MODEL}.gguf", max_ctx=256)


def test_a_federation_made_with_init_invite_join_deploys_chats_and_refuses_strangers(
    tmp_path: Path,
    model_dir: Path,  # noqa: F811
    local: LocalModel,
) -> None:
    params = SamplingParams.greedy(max_tokens=16)
    want = local_answer(local, "Hello world the cat", params)
    assert "created: id ef" in cli("init", "campus", "--data-dir", str(tmp_path / "n0"))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            n0 = await _start(nursery, node_config(tmp_path, "n0", models=[model_dir]))
            port0 = n0.node.port
            # n0 runs: `invite` finds its address in n0/node.json; n1 and n2 join over HTTP
            for name in ("n1", "n2"):
                token = cli("invite", "--data-dir", str(tmp_path / "n0")).strip()
                m = await join_federation(token, Identity.load_or_create(tmp_path / name), tmp_path / name)
                assert m.active and not m.is_admin and m.id == n0.node.membership.id
                with pytest.raises(AuthenticationError):  # the token was for one use
                    await join_federation(token, Identity.generate(), tmp_path / f"{name}-again")
            n1 = await _start(
                nursery, node_config(tmp_path, "n1", peers=[("127.0.0.1", port0)], memory=200 * MiB)
            )
            n2 = await _start(nursery, node_config(tmp_path, "n2", peers=[("127.0.0.1", port0)]))
            admin = httpx.AsyncClient(auth=signer(tmp_path / "n0"))
            member = httpx.AsyncClient(auth=signer(tmp_path / "n1"))
            stranger = httpx.AsyncClient()
            async with admin, member, stranger:
                r = await deploy(admin, n0.url, workers=["n0", "n1", "n2"])
                assert r.status_code == 200, r.text
                assert [s["worker"] for s in r.json()["stages"]] == ["n0", "n1", "n2"]
                for _ in range(50):  # n1 routes to the head on n0 once its peer poll saw it
                    if any(b.model_id == MODEL for b in n1.node.backends()):
                        break
                    await trio.sleep(0.1)
                assert joined(await generate(member, n1.url, "Hello world the cat", params)) == want
                # stages link to each other over member-checked links
                assert all(s["link"] in ("direct", None) for s in (await admin.get(
                    f"{n0.url}/api/v1/pipeline/status")).json()["deployments"][0]["stages"])  # fmt: skip

                await refuses_a_stranger(n0, stranger, member, tmp_path)

                # revoke n2 with the CLI (it writes n0's revoked.json; the running n0 picks it up and pushes)
                t0 = time.perf_counter()
                cli("revoke", n2.node.identity.peer_id, "--data-dir", str(tmp_path / "n0"))
                n2_id = n2.node.identity.peer_id
                with trio.fail_after(5):
                    while n2_id not in n1.node.membership.revocations or any(  # noqa: ASYNC110 (polled state)
                        link.peer_id == n2_id for link in n1.node.membership.links
                    ):
                        await trio.sleep(0.05)
                closed_s = time.perf_counter() - t0
                for n in (n0, n1):  # and it leaves the peer tables, and stays out of them
                    assert n2_id not in n.node.peers.table
                    await n.node.peers.refresh()
                    assert n2_id not in n.node.peers.table
                with trio.fail_after(6):  # the coordinator reports n2's stage as lost, and why
                    while True:  # (seen in the deployment, or in the recovery that may already replace it)
                        status = (await admin.get(f"{n0.url}/api/v1/pipeline/status")).json()
                        deps = status["deployments"][:1]
                        stages = [s for d in deps for s in d["stages"][2:] if s["state"] == "lost"]
                        lost = [s.get("error") or "" for s in stages]
                        lost += [why for r in status["recovered"] for why in r.get("why", {}).values()]
                        if lost:
                            break
                        await trio.sleep(0.2)
                assert any("revoked" in why for why in lost), lost
                revoked = httpx.AsyncClient(auth=signer(tmp_path / "n2"))
                async with revoked:
                    r = await revoked.get(f"{n0.url}/api/v1/models/{MODEL}/tensors")
                    assert r.status_code == 401 and r.json()["error"]["code"] == "revoked"
                with pytest.raises(AuthenticationError, match="revoked"):
                    await open_tcp_link("127.0.0.1", n0.node.worker.link_port, n2.node.identity,
                                        n0.node.identity.peer_id)  # fmt: skip
                print(f"revocation: links to the revoked member closed on n1 after {closed_s * 1000:.0f} ms")
                # the rest keeps serving: deploy over n0 and n1 again
                r = await deploy(admin, n0.url, workers=["n0", "n1"])
                assert r.status_code == 200, r.text
            nursery.cancel_scope.cancel()

    trio.run(main)


async def refuses_a_stranger(n0, stranger: httpx.AsyncClient, member: httpx.AsyncClient, tmp: Path) -> None:  # type: ignore[no-untyped-def]
    """Every path a stranger could use is refused with 401 and the JSON error shape; a member is no admin."""
    url = n0.url
    for method, path, body in [
        ("GET", "/api/v1/node", None),
        ("GET", "/api/v1/peers", None),
        ("GET", "/v1/models", None),
        ("GET", f"/api/v1/models/{MODEL}/tensors", None),
        ("GET", f"/api/v1/models/{MODEL}/blob", None),
        ("GET", "/api/v1/pipeline/status", None),
        ("POST", "/api/v1/pipeline/deploy", {"model": MODEL}),
        ("POST", "/api/v1/pipeline/undeploy", {"model": MODEL}),
        ("POST", "/api/v1/pipeline/unload", {"deployment_id": "x"}),
        ("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
    ]:
        r = await stranger.request(method, f"{url}{path}", json=body)
        assert r.status_code == 401, (path, r.status_code, r.text)
        err = r.json()["error"]
        assert err["type"] == "authentication_error" and err["code"] and err["message"], err
    r = await member.post(f"{url}/api/v1/pipeline/undeploy", json={"model": MODEL})
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_admin"
    # another federation's member signs correctly, yet is no member of this one
    cli("init", "elsewhere", "--data-dir", str(tmp / "other"))
    async with httpx.AsyncClient(auth=signer(tmp / "other")) as other:
        r = await other.get(f"{url}/api/v1/node")
        assert r.status_code == 401 and r.json()["error"]["code"] == "other_federation"
    # a stranger's link to n0's worker is refused at the handshake
    with pytest.raises(AuthenticationError, match="membership"):
        await open_tcp_link(
            "127.0.0.1", n0.node.worker.link_port, Identity.generate(), n0.node.identity.peer_id
        )
    # a stranger node pointed at n0 with --peer learns nothing of the federation
    async with trio.open_nursery() as nursery:
        s = await _start(nursery, node_config(tmp, "stranger", peers=[("127.0.0.1", n0.node.port)]))
        await s.node.peers.refresh()
        assert s.node.peers.table.peers() == [] and s.node.router is not None
        r = await stranger.get(f"{s.url}/v1/models")
        assert r.status_code == 200 and r.json()["data"] == []
        nursery.cancel_scope.cancel()
    r = await member.get(f"{url}/api/v1/node")  # and the federation keeps serving its members
    assert r.status_code == 200 and r.json()["federation"]["id"]


FAST_RELAY = {"backoff_initial_s": 0.1, "backoff_max_s": 0.5, "announce_interval_s": 0.2}


def test_members_behind_two_nats_join_through_the_relay_and_deploy_from_behind_nat(
    tmp_path: Path,
    model_dir: Path,  # noqa: F811
    local: LocalModel,
) -> None:
    """Central IT's public host is relay + data peer and the federation's root; two workers behind NATs (no
    inbound connections, not even from each other) join with relay-only invites, and the one invited as an
    admin deploys from behind its NAT. A stranger cannot register at the relay."""
    from eldric_p2p.net.discovery import PeerTable
    from eldric_p2p.net.relay.client import RelayMember
    from eldric_p2p.node import Node

    params = SamplingParams.greedy(max_tokens=12)
    want = local_answer(local, "the cat sat", params)
    cli("init", "campus", "--data-dir", str(tmp_path / "hub"))
    fast = {"listen_port": 0, "mdns": False, "peer_interval": 0.2}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            hub = Node(NodeConfig(name="hub", data_dir=tmp_path / "hub", worker=False, models=[model_dir],
                                  relay_listen=("127.0.0.1", 0), **fast))  # fmt: skip
            await nursery.start(hub.run)
            assert hub.relay is not None and hub.relay.address is not None
            at = [("127.0.0.1", hub.relay.address[1])]
            for name, admin in (("w0", True), ("w1", False)):
                token = cli("invite", "--relay-only", *(["--admin"] if admin else []),
                            "--data-dir", str(tmp_path / "hub")).strip()  # fmt: skip
                m = await join_federation(token, Identity.load_or_create(tmp_path / name), tmp_path / name)
                assert m.is_admin is admin
            assert hub.relay.stats.guests == 2 and hub.federation.stats["joined"] == 2
            w = {
                name: Node(
                    NodeConfig(
                        name=name,
                        data_dir=tmp_path / name,
                        relays=at,
                        relay_options=FAST_RELAY,
                        memory=300 * MiB,
                        **fast,
                    )
                )  # fmt: skip
                for name in ("w0", "w1")
            }
            w["w0"].connector.no_direct.add(w["w1"].identity.peer_id)
            w["w1"].connector.no_direct.add(w["w0"].identity.peer_id)
            for node in w.values():
                hub.connector.no_direct.add(node.identity.peer_id)
                await nursery.start(node.run)

            # a stranger: its own identity, pointed at the relay; it never registers and sees nobody
            table = PeerTable()
            stranger = RelayMember(Identity.generate(), *at[0], table, dict, backoff_initial_s=0.1)
            nursery.start_soon(stranger.run)
            with trio.fail_after(10):
                while hub.identity.peer_id not in w["w0"].peers.table or stranger.last_error is None:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            assert not stranger.registered and len(table) == 0 and "not_member" in stranger.last_error
            assert hub.relay.stats.rejected_not_member >= 1

            async with httpx.AsyncClient(timeout=60, auth=signer(tmp_path / "w0")) as c:
                body = {"model": MODEL, "workers": ["w0", "w1"], "max_ctx": 256}
                with trio.fail_after(20):
                    while True:  # w1's announcement reaches w0 through the relay too
                        r = await c.post(f"{w['w0'].url}/api/v1/pipeline/deploy", json=body)
                        if r.status_code != 409 or "w1" not in r.text:
                            break
                        await trio.sleep(0.1)
                assert r.status_code == 200, r.text
                assert [s["worker"] for s in r.json()["stages"]] == ["w0", "w1"]
                assert joined(await generate(c, w["w0"].url, "the cat sat", params)) == want
                assert w["w0"].connector.paths[w["w1"].identity.peer_id] == "relayed"
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_member_renews_its_certificate_at_its_issuer_and_a_revoked_one_cannot(tmp_path: Path) -> None:
    from eldric_p2p.net.federation.certs import Issuer

    cli("init", "campus", "--data-dir", str(tmp_path / "n0"))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            n0 = await _start(nursery, node_config(tmp_path, "n0", memory=None))
            for name in ("n1", "n2"):
                token = cli("invite", "--data-dir", str(tmp_path / "n0")).strip()
                await join_federation(token, Identity.load_or_create(tmp_path / name), tmp_path / name)
            n1 = await _start(nursery, node_config(tmp_path, "n1", peers=[("127.0.0.1", n0.node.port)]))
            n2 = await _start(nursery, node_config(tmp_path, "n2", peers=[("127.0.0.1", n0.node.port)]))
            m1 = n1.node.membership
            # give n1 a certificate in its last hour, as if it had been running for days
            issuer = n0.node.membership.issuer()
            m1.save(m1.federation.root_pem(), Issuer(issuer.key, issuer.cert).issue(
                n1.node.identity.public_key, now=time.time() - 7 * 86400 + 3600))  # fmt: skip
            old = m1.cert
            assert n1.node.federation._needs_renewal(time.time())
            assert await n1.node.federation.renew()
            assert m1.cert.not_after - time.time() > 6.9 * 86400 and m1.cert.serial != old.serial
            assert not n1.node.federation._needs_renewal(time.time())
            assert n0.node.federation.stats["renewed"] == 1
            # the root holder renews itself from its own key
            assert await n0.node.federation.renew()
            # a revoked member is refused (its signed request fails at the issuer's gate)
            cli("revoke", n2.node.identity.peer_id, "--data-dir", str(tmp_path / "n0"))
            with trio.fail_after(3):
                while n2.node.identity.peer_id not in n0.node.membership.revocations:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            before = n2.node.membership.cert
            assert not await n2.node.federation.renew()
            assert n2.node.membership.cert == before
            nursery.cancel_scope.cancel()

    trio.run(main)
