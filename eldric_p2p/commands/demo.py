"""`eldric-p2p demo`: the whole network on one machine, in one command.

Starts a data peer and N workers as separate `eldric-p2p node` processes on loopback (free ports, temporary
data dirs, no mDNS), fetches the reference model if needed, deploys it across the workers through the data
peer's coordinator API (`POST /api/v1/pipeline/deploy`), streams the answer to one chat prompt from the entry
node (which hosts no stage: the request is routed to the pipeline), prints the dashboard and OpenAI URLs and
serves until Ctrl-C. Every process it started is stopped on the way out, errors included.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from eldric_p2p.errors import EldricError, PeerUnavailable, UsageError
from eldric_p2p.tasks import open_nursery

URL_LINE = re.compile(r"serving on (http://\S+)")
START_TIMEOUT = 120.0
PEERS_TIMEOUT = 60.0
DEPLOY_TIMEOUT = 900.0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="start a data peer and workers on this machine, deploy a model, chat")
    p.add_argument("--model", default="qwen", help="reference model name or a .gguf path (default qwen)")
    p.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    p.add_argument(
        "--prompt", default="Write a Python function that reverses a string.", help="the chat prompt"
    )
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument(
        "--memory", default=None, help="memory each worker offers, e.g. 1GiB (default: what it has)"
    )
    p.add_argument("--device", default="cpu", help="device of the workers (default cpu)")
    p.add_argument(
        "--no-wait", action="store_true", help="exit after the answer instead of serving until Ctrl-C"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary data dirs and logs")


@dataclass
class NodeProc:
    name: str
    process: trio.Process
    log: Path
    url: str = ""

    def tail(self, n: int = 20) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"    {self.name}| {line}" for line in lines[-n:])


def say(text: str) -> None:
    print(f"\033[2m[demo]\033[0m {text}" if sys.stdout.isatty() else f"[demo] {text}", flush=True)


def model_file(name: str) -> Path:
    """The GGUF file: a path, or a reference model (assembled from its PyPI packages when missing)."""
    from eldric_p2p.commands.progress import assemble_with_progress
    from eldric_p2p.data.refmodels import assemble, is_present, lookup

    path = Path(name)
    if path.is_file():
        return path
    ref = lookup(name)
    if is_present(ref):
        return assemble(ref)  # already there: checks size and sha256 only
    say(f"assembling {ref.name} from its PyPI packages and checking its sha256 (once; later runs reuse it)…")
    return assemble_with_progress(ref)


async def start_node(root: Path, name: str, argv: list[str]) -> NodeProc:
    """Start `eldric-p2p node` with its output in `root/name.log`; return once it prints its URL."""
    data = root / name
    data.mkdir(parents=True, exist_ok=True)
    log = root / f"{name}.log"
    cmd = [sys.executable, "-m", "eldric_p2p", "node", "--name", name, "--data-dir", str(data),
           "--listen", "127.0.0.1:0", "--no-mdns", *argv]  # fmt: skip
    with open(log, "wb") as out:  # noqa: ASYNC230 - creating an empty log file does not block
        # A session of its own: Ctrl-C in the terminal reaches the demo, which then stops the nodes in order.
        proc = await trio.lowlevel.open_process(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    node = NodeProc(name, proc, log)
    with trio.move_on_after(START_TIMEOUT):
        while True:
            m = URL_LINE.search(log.read_text(errors="replace"))
            if m:
                node.url = m.group(1)
                return node
            if proc.returncode is not None or proc.poll() is not None:
                raise PeerUnavailable(f"node {name} exited with status {proc.returncode}:\n{node.tail()}")
            await trio.sleep(0.1)
    proc.kill()
    raise PeerUnavailable(f"node {name} did not start within {START_TIMEOUT:.0f} s:\n{node.tail()}")


async def stop_all(nodes: list[NodeProc]) -> None:
    """SIGINT every node (stop now: SIGTERM would drain, moving stages to nodes that stop too), then
    SIGKILL what is still running after 5 s."""
    for node in nodes:
        if node.process.returncode is None:
            node.process.send_signal(signal.SIGINT)
    with trio.move_on_after(5):
        for node in nodes:
            await node.process.wait()
    for node in nodes:
        if node.process.returncode is None:
            node.process.kill()
            await node.process.wait()


async def wait_for_peers(client: httpx.AsyncClient, url: str, names: list[str]) -> None:
    with trio.move_on_after(PEERS_TIMEOUT):
        while True:
            try:
                r = await client.get(url + "/api/v1/peers")
                seen = {p.get("name") for p in r.json().get("peers", [])} if r.status_code == 200 else set()
            except (httpx.HTTPError, ValueError):
                seen = set()
            if set(names) <= seen:
                return
            await trio.sleep(0.5)
    raise PeerUnavailable(
        f"the entry node did not see all workers ({', '.join(names)}) within {PEERS_TIMEOUT:.0f} s"
    )


async def deploy(client: httpx.AsyncClient, url: str, model: str, workers: list[str]) -> dict[str, Any]:
    from eldric_p2p.commands.progress import deploy_with_progress

    async with httpx.AsyncClient(timeout=DEPLOY_TIMEOUT) as slow:
        r = await deploy_with_progress(slow, url, {"model": model, "workers": workers})
    try:
        body = r.json()
    except ValueError:
        body = {"error": {"message": r.text[:500]}}
    if r.status_code != 200:
        msg = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
        raise PeerUnavailable(f"deploy failed ({r.status_code}): {msg or body}")
    return body


async def chat(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int
) -> dict[str, Any]:
    """Stream the answer to stdout through the OpenAI endpoint; return usage and timings."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    first: float | None = None
    usage: dict[str, Any] = {}
    async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise PeerUnavailable(
                f"chat failed ({r.status_code}): {(await r.aread()).decode(errors='replace')}"
            )
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise PeerUnavailable(f"generation failed: {chunk['error'].get('message')}")
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    first = first or time.perf_counter()
                    sys.stdout.write(text)
                    sys.stdout.flush()
            usage = chunk.get("usage") or usage
    sys.stdout.write("\n")
    return {
        "usage": usage,
        "ttft_s": (first or time.perf_counter()) - t0,
        "total_s": time.perf_counter() - t0,
    }


async def run_demo(args: argparse.Namespace, root: Path) -> None:
    if not 1 <= args.workers <= 16:
        raise UsageError("--workers must be between 1 and 16")
    path = await trio.to_thread.run_sync(model_file, args.model)
    model_id = path.stem
    nodes: list[NodeProc] = []
    try:
        say(f"starting a data peer serving {path.name}…")
        entry = await start_node(root, "demo-data", ["--no-worker", "--models", str(path)])
        nodes.append(entry)
        names = [f"demo-worker-{i + 1}" for i in range(args.workers)]
        extra = ["--device", args.device] + (["--memory", args.memory] if args.memory else [])
        async with open_nursery() as nursery:

            async def one(name: str) -> None:
                nodes.append(
                    await start_node(root, name, ["--peer", entry.url.removeprefix("http://"), *extra])
                )

            for name in names:
                nursery.start_soon(one, name)
        say(f"started {len(nodes)} nodes: " + ", ".join(f"{n.name} {n.url}" for n in nodes))
        async with httpx.AsyncClient(timeout=30) as client:
            await wait_for_peers(client, entry.url, names)
            say(f"deploying {model_id} across {', '.join(names)} (each worker fetches only its layers)…")
            t0 = time.perf_counter()
            dep = await deploy(client, entry.url, model_id, names)
            layout = ", ".join(
                f"{s['worker']} layers {s['start']}-{s['end'] - 1}" for s in dep.get("stages", [])
            )
            say(f"pipeline ready in {time.perf_counter() - t0:.1f} s: {layout}")
            say(f"prompt: {args.prompt}")
            out = await chat(client, entry.url, model_id, args.prompt, args.max_tokens)
            usage = out["usage"]
            say(f"{usage.get('completion_tokens', '?')} tokens, first after {out['ttft_s']:.2f} s, "
                f"total {out['total_s']:.2f} s (asked {entry.name}, which hosts no stage)")  # fmt: skip
        print()
        print(f"  dashboard:  {entry.url}/")
        print(f'  OpenAI API: {entry.url}/v1   (model "{model_id}")')
        print(f"  try:        curl {entry.url}/v1/chat/completions -H 'content-type: application/json' \\")
        example = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "Hi"}]})
        print(f"                -d '{example}'")
        print(f'  python:     OpenAI(base_url="{entry.url}/v1", api_key="-")   (pip install openai)')
        print(f"  logs:       {root}")
        print(flush=True)
        if args.no_wait:
            return
        say("serving; press Ctrl-C to stop every node")
        while True:
            for node in nodes:
                if node.process.poll() is not None:
                    raise PeerUnavailable(
                        f"node {node.name} exited with status {node.process.returncode}:\n{node.tail()}"
                    )
            await trio.sleep(1)
    except EldricError:
        for node in nodes:
            if node.tail():
                print(node.tail(), file=sys.stderr)
        raise
    finally:
        with trio.CancelScope(shield=True):
            if nodes:
                say(f"stopping {len(nodes)} nodes…")
            await stop_all(nodes)


async def run_until_signalled(args: argparse.Namespace, root: Path) -> None:
    """Run the demo; SIGTERM and SIGHUP (`kill`, a closed terminal) stop it like Ctrl-C: every node too."""
    async with open_nursery() as nursery:

        async def watch() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
                async for signum in signals:
                    say(f"got {signal.Signals(signum).name}")
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(watch)
        await run_demo(args, root)
        nursery.cancel_scope.cancel()


def main(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="eldric-demo-"))
    try:
        trio.run(run_until_signalled, args, root)
    except KeyboardInterrupt:
        say("stopped")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0
