#!/usr/bin/env python3
"""The NAT lab: two NATed sites and a public segment in network namespaces, with user-space WAN delay.

    sudo python tunnel/natlab.py up [--delay-ms 20] [--prefix elp] [--nat eim]   # build it (+ the forwarder)
    sudo python tunnel/natlab.py down [--prefix elp]                              # remove everything
    sudo ip netns exec elp-a1 ping 10.99.0.10                                      # use it

Topology (every address lives only inside the lab's namespaces; nothing is routed to the host or beyond):

    public segment 10.99.0.0/24  (one L2 segment, bridged by the delay forwarder in "elp-inet")
      elp-relay  10.99.0.10           the edge relay
      elp-data   10.99.0.20           the data peer
      elp-nata   10.99.0.101 (wan) -- NAT -- 192.168.1.1 (br0) -- elp-a1 192.168.1.11, elp-a2 192.168.1.12
      elp-natb   10.99.0.102 (wan) -- NAT -- 192.168.2.1 (lan0) -- elp-b1 192.168.2.11

The NAT routers masquerade outbound traffic (nftables) and forward nothing inbound except replies
(conntrack established/related). The public hosts do have routes to the sites via the routers, so an inbound
attempt is dropped by the NAT's policy, not merely unroutable.

How the routers map UDP (`--nat`, `Lab(nat=...)`), checked with probes on this machine's kernel (6.18,
nftables 1.0.6): sockets at a1 and b1 learn their public address from a public echo, then probe each other,
one side starting 0 or 100 ms after the other.

- `masquerade` (the default; `masquerade`): port-preserving and endpoint-independent (one public port
  toward every destination). Hole punching works only when both first probes leave their NAT before the
  other's arrive (0 ms: yes, 100 ms: no): an early probe leaves a conntrack entry for the router itself, the
  later outbound mapping clashes with it and gets another port.
- `eim` (`masquerade`, and the router drops unsolicited packets to itself on its WAN before conntrack
  confirms them, as a home router's firewall does): endpoint-independent, port-preserving mapping with
  address- and port-dependent filtering (a port-restricted cone). Punching works at either start.
- `symmetric` (`masquerade fully-random`, and the same drop): a random public port per destination, so the
  port the relay sees is useless to the peer. Punching never works; links fall back to the relay.

WAN delay: this kernel has no netem, so a forwarder run in elp-inet moves Ethernet frames between the four
public-side veths over AF_PACKET sockets as a learning bridge, holding each frame in a delay queue for
`delay-ms` per WAN port it crosses (site<->public: 1x, site A<->site B: 2x): forward.c, built with the
system's C compiler on first use (`forwarder_binary`), or `forward` below in Python where none builds (or with
ELDRIC_NATLAB_FORWARDER=python). Faithfulness: a fixed delay with no jitter, loss or reordering; frames are
serviced by one thread at real-time priority, so the nodes' compute does not hold them back (with 7 nodes on 2
cores, 20 ms per link: frames go out late by a median 0.05-0.11 ms in C, 0.09-0.13 in Python, p99 0.16-0.36;
the Python one at normal priority 0.13-0.15 and 1.5-2.7 ms), with a throughput ceiling in the tens of
thousands of frames per second; the queue is bounded (overflow drops, like a router buffer). Offloads are
disabled on those veths so frames stay MTU-sized. Each port's socket buffer is 16 MiB: with the default (~200
KiB) a WAN burst arriving while the thread worked was dropped by the kernel unseen, and TCP through the lab
crawled (8.5 MB/s for one download at 20 ms against 57 MB/s now); the forwarder prints such drops, and its
own, when it stops.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import ctypes
import hashlib
import heapq
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SO_TIMESTAMPNS = 35  # linux/asm-generic/socket.h (SCM_TIMESTAMPNS is the same number); not in Python's socket
TIMESPEC = struct.Struct("=qq")
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SOL_PACKET, PACKET_STATISTICS = 263, 6  # linux/socket.h, linux/if_packet.h
PACKET_IGNORE_OUTGOING = 23  # linux/if_packet.h (4.20+): no copy of the frames we send comes back to us
PACKET_STATS = struct.Struct("=II")  # struct tpacket_stats: packets, drops
SOCKET_BUFFER = 16 * 1024 * 1024  # per bridge port: a WAN burst waits in the kernel while the thread works
MAX_QUEUE = 4096
FORWARDER_PORTS = ("pr", "pd", "pa", "pb")  # the forwarder's veths in inet: relay, data peer, NAT A, NAT B
FIFO_PRIORITY = 10  # the forwarder's real-time priority (see _like_hardware)
PR_SET_TIMERSLACK = 29  # linux/prctl.h
MAX_LATE = 1_000_000  # delayed frames whose lateness the forwarder keeps for its report (8 MB)

PUBLIC_NET = "10.99.0"
HOSTS = {  # role -> (address, default gateway or None)
    "relay": (f"{PUBLIC_NET}.10", None),
    "data": (f"{PUBLIC_NET}.20", None),
    "a1": ("192.168.1.11", "192.168.1.1"),
    "a2": ("192.168.1.12", "192.168.1.1"),
    "b1": ("192.168.2.11", "192.168.2.1"),
}
NATS = {  # router -> (wan address, lan address, lan prefix, hosts)
    "nata": (f"{PUBLIC_NET}.101", "192.168.1.1", "192.168.1.0/24", ("a1", "a2")),
    "natb": (f"{PUBLIC_NET}.102", "192.168.2.1", "192.168.2.0/24", ("b1",)),
}


NAT_KINDS = ("masquerade", "eim", "symmetric")


def nat_ruleset(kind: str, lan: str) -> str:
    """The nftables ruleset of a site's NAT router: `lan` is its LAN device, "wan" its public one.

    Every kind forwards LAN -> WAN and only replies (conntrack established/related) WAN -> LAN. They differ in
    how outbound UDP is mapped and in what unsolicited inbound packets leave behind (see NAT_DOC).
    """
    if kind not in NAT_KINDS:
        raise LabError(f"unknown NAT kind {kind!r} (one of {', '.join(NAT_KINDS)})")
    masquerade = "masquerade fully-random" if kind == "symmetric" else "masquerade"
    # eim/symmetric: the router drops unsolicited packets addressed to itself on its WAN side before conntrack
    # confirms them, as a home router's firewall does, so an early probe from a peer leaves no entry behind
    input_chain = (
        """
    chain input {
        type filter hook input priority 0; policy accept;
        iifname "wan" ct state new drop
    }"""
        if kind != "masquerade"
        else ""
    )
    return f"""
table ip natlab {{
    chain forward {{
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "{lan}" oifname "{lan}" accept
        iifname "{lan}" oifname "wan" accept
    }}{input_chain}
    chain postrouting {{
        type nat hook postrouting priority 100;
        oifname "wan" {masquerade}
    }}
}}
"""


class LabError(RuntimeError):
    """The lab could not be built (missing tool, not root, a command failed)."""


def missing_requirements() -> str | None:
    """Why the lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "the NAT lab needs root (network namespaces)"
    for tool in ("ip", "nft", "ethtool"):
        if shutil.which(tool) is None:
            return f"the NAT lab needs `{tool}` (apt-get install -y iproute2 nftables ethtool)"
    return None


def _run(*argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, input=input)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


@dataclass
class Lab:
    prefix: str = "elp"
    delay_ms: float = 0.0
    nat: str = "masquerade"
    forwarder: subprocess.Popen[bytes] | None = None
    forwarder_report: str = ""  # what the forwarder said when it stopped (its lateness, any drops)
    forwarder_kind: str = ""  # "C" (forward.c) or "Python" (`forward` below)
    namespaces: list[str] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def addr(self, role: str) -> str:
        return HOSTS[role][0] if role in HOSTS else NATS[role][0]

    def argv(self, role: str, argv: Sequence[str]) -> list[str]:
        """`argv` prefixed to run inside `role`'s namespace."""
        return ["ip", "netns", "exec", self.ns(role), *argv]

    def exec(self, role: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(*self.argv(role, argv), check=check)

    def popen(self, role: str, argv: Sequence[str], **kw: object) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(role, argv), text=True, **kw)  # type: ignore[call-overload,no-any-return]

    # ------------------------------------------------------------------------------------------ build

    def _netns(self, role: str) -> str:
        name = self.ns(role)
        _run("ip", "netns", "add", name)
        self.namespaces.append(name)
        self.exec(role, "ip", "link", "set", "lo", "up")
        self.exec(role, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        self.exec(role, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
        return name

    def _veth(self, role_a: str, dev_a: str, role_b: str, dev_b: str, *, no_offload: bool = False) -> None:
        """A veth pair created directly inside the two namespaces (never in the host's)."""
        _run(
            "ip",
            "-n",
            self.ns(role_a),
            "link",
            "add",
            dev_a,
            "type",
            "veth",
            "peer",
            "name",
            dev_b,
            "netns",
            self.ns(role_b),
        )
        for role, dev in ((role_a, dev_a), (role_b, dev_b)):
            if no_offload:
                self.exec(
                    role,
                    "ethtool",
                    "-K",
                    dev,
                    "tx",
                    "off",
                    "tso",
                    "off",
                    "gso",
                    "off",
                    "gro",
                    "off",
                    check=False,
                )
            self.exec(role, "ip", "link", "set", dev, "up")

    def up(self) -> None:
        if (why := missing_requirements()) is not None:
            raise LabError(why)
        try:
            self._build()
        except BaseException:
            self.down()
            raise

    def _build(self) -> None:
        self._netns("inet")
        for role in (*HOSTS, *NATS):
            self._netns(role)
        # public side: every public host and NAT WAN gets a veth to the forwarder in inet
        ports = {"relay": "pr", "data": "pd", "nata": "pa", "natb": "pb"}
        for role, port in ports.items():
            dev = "wan" if role in NATS else "eth0"
            self._veth("inet", port, role, dev, no_offload=True)
            self.exec(role, "ip", "addr", "add", f"{self.addr(role)}/24", "dev", dev)
        for role in ports:
            self.exec("inet", "ip", "link", "set", ports[role], "promisc", "on")
        # the sites
        for nat, (_, lan_addr, lan_net, hosts) in NATS.items():
            if len(hosts) > 1:
                self.exec(nat, "ip", "link", "add", "br0", "type", "bridge")
                self.exec(nat, "ip", "link", "set", "br0", "up")
                lan = "br0"
            else:
                lan = "lan0"
            for i, host in enumerate(hosts):
                dev = f"l{host}" if lan == "br0" else "lan0"
                self._veth(nat, dev, host, "eth0")
                if lan == "br0":
                    self.exec(nat, "ip", "link", "set", dev, "master", "br0")
                self.exec(host, "ip", "addr", "add", f"{HOSTS[host][0]}/24", "dev", "eth0")
                self.exec(host, "ip", "route", "add", "default", "via", lan_addr)
                del i
            self.exec(nat, "ip", "addr", "add", f"{lan_addr}/24", "dev", lan)
            self.exec(nat, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            _run(*self.argv(nat, ["nft", "-f", "-"]), input=nat_ruleset(self.nat, lan))
            # public hosts know where the site is: an inbound attempt reaches the NAT and is dropped there
            for public in ("relay", "data"):
                self.exec(public, "ip", "route", "add", lan_net, "via", self.addr(nat))
        native = forwarder_binary()
        self.forwarder_kind = "C" if native is not None else "Python"
        program = [native] if native is not None else [sys.executable, os.path.abspath(__file__), "forward"]
        self.forwarder = subprocess.Popen(
            self.argv(
                "inet", [*program, "--delay-ms", str(self.delay_ms), "--wan", "pa,pb", *FORWARDER_PORTS]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._wait_forwarding()

    def _wait_forwarding(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.forwarder is not None and self.forwarder.poll() is not None:
                err = self.forwarder.stderr.read().decode() if self.forwarder.stderr else ""
                raise LabError(f"delay forwarder exited: {err.strip()}")
            if self.tcp_probe("a1", self.addr("relay"), 9, timeout=1.0) != "timeout":
                return
        raise LabError("the lab does not forward (a1 cannot reach the relay host)")

    def tcp_probe(self, role: str, host: str, port: int, timeout: float = 2.0) -> str:
        """Try a TCP connection from `role`: "connected", "refused" (the host answered with RST), or
        "timeout"/"unreachable" (nothing came back)."""
        code = (
            "import socket,sys\n"
            f"s=socket.socket(); s.settimeout({timeout})\n"
            f"try: s.connect(({host!r},{port})); print('connected')\n"
            "except ConnectionRefusedError: print('refused')\n"
            "except (TimeoutError, socket.timeout): print('timeout')\n"
            "except OSError: print('unreachable')\n"
        )
        return self.exec(role, sys.executable, "-c", code, check=False).stdout.strip() or "unreachable"

    def reset_forwarder_stats(self) -> None:
        """The forwarder's report (`forwarder_report`, when the lab comes down) counts from now on."""
        if self.forwarder is not None:
            self.forwarder.send_signal(signal.SIGUSR1)

    def down(self) -> None:
        """Stop the forwarder and delete every namespace of this lab (veths go with them)."""
        if self.forwarder is not None:
            self.forwarder.send_signal(signal.SIGTERM)
            try:
                _, err = self.forwarder.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                self.forwarder.kill()
                _, err = self.forwarder.communicate()
            self.forwarder_report = err.decode(errors="replace").strip() if err else ""
            self.forwarder = None
        for name in lab_namespaces(self.prefix):
            _kill_namespace_processes(name)
            _run("ip", "netns", "del", name, check=False)
        self.namespaces.clear()


def lab_namespaces(prefix: str) -> list[str]:
    roles = ("inet", *HOSTS, *NATS)
    existing = _run("ip", "netns", "list", check=False).stdout.split()
    return [f"{prefix}-{r}" for r in roles if f"{prefix}-{r}" in existing]


def _kill_namespace_processes(name: str) -> None:
    pids = _run("ip", "netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def natlab(prefix: str = "elp", delay_ms: float = 0.0, nat: str = "masquerade") -> Iterator[Lab]:
    """Build the lab for the duration of a `with` block; always torn down, even on errors."""
    lab = Lab(prefix=prefix, delay_ms=delay_ms, nat=nat)
    lab.down()  # leftovers of an earlier run with the same prefix
    lab.up()
    try:
        yield lab
    finally:
        lab.down()


# ---------------------------------------------------------------------------------------------- nodes


RELAY_PORT = 4433
HTTP_PORT = 8470
WORKERS = ("a1", "a2", "b1")


class Node:
    """An `eldric-p2p node` process inside a lab namespace; its log goes to `log`."""

    def __init__(self, lab: Lab, role: str, argv: Sequence[str], log: str) -> None:
        self.role = role
        self.url = f"http://{lab.addr(role)}:{HTTP_PORT}"
        self.log = log
        with open(log, "ab") as f:
            self.proc = lab.popen(role, argv, stdout=subprocess.PIPE, stderr=f)
        self.peer_id = ""

    def wait_serving(self, timeout: float = 60.0) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise LabError(f"node {self.role} exited (rc={self.proc.poll()}); see {self.log}")
            if "serving on" in line:
                self.peer_id = line.split("(", 1)[1].split(")", 1)[0]
                return
        raise LabError(f"node {self.role} did not start within {timeout} s; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def node_argv(lab: Lab, role: str, data_dir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "eldric_p2p", "-v", "node", "--name", role, "--data-dir", data_dir,
            "--listen", f"{lab.addr(role)}:{HTTP_PORT}", "--no-mdns", *extra]  # fmt: skip


@dataclass
class Federation:
    """The lab's eldric-p2p processes: a relay node, a data peer (public), workers a1, a2 (site A), b1 (B).

    Every node but the relay is a `--relay` member; none has `--peer`: they know each other from the relay.
    """

    lab: Lab
    tmp: str
    models: str
    memory: str = "1GiB"
    workers: tuple[str, ...] = WORKERS
    worker_args: tuple[str, ...] = ()  # more `eldric-p2p node` flags for the workers
    nodes: dict[str, Node] = field(default_factory=dict)

    def start_relay(self) -> Node:
        argv = node_argv(self.lab, "relay", f"{self.tmp}/relay", "--no-worker",
                         "--relay-listen", f"0.0.0.0:{RELAY_PORT}")  # fmt: skip
        node = self.nodes["relay"] = Node(self.lab, "relay", argv, f"{self.tmp}/relay.log")
        node.wait_serving()
        return node

    def start(self) -> None:
        self.start_relay()
        relay = f"{self.lab.addr('relay')}:{RELAY_PORT}"
        argv = node_argv(self.lab, "data", f"{self.tmp}/data", "--no-worker", "--models", self.models,
                         "--relay", relay)  # fmt: skip
        self.nodes["data"] = Node(self.lab, "data", argv, f"{self.tmp}/data.log")
        for role in self.workers:
            argv = node_argv(self.lab, role, f"{self.tmp}/{role}", "--device", "cpu", "--memory", self.memory,
                             "--relay", relay, *self.worker_args)  # fmt: skip
            self.nodes[role] = Node(self.lab, role, argv, f"{self.tmp}/{role}.log")
        for role in ("data", *self.workers):
            self.nodes[role].wait_serving()

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()

    def cli(self, role: str, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """`eldric-p2p ARGV` run inside `role`'s namespace."""
        return subprocess.run(self.lab.argv(role, [sys.executable, "-m", "eldric_p2p", *argv]),
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip

    def get(self, role: str, url: str, timeout: float = 10.0) -> object:
        """GET `url` from inside `role`'s namespace; the decoded JSON."""
        import json

        code = (
            "import sys, urllib.request\n"
            f"print(urllib.request.urlopen({url!r}, timeout={timeout}).read().decode())\n"
        )
        out = self.lab.exec(role, sys.executable, "-c", code)
        return json.loads(out.stdout)

    def stage_links(self, timeout: float = 30.0) -> list[tuple[str, str | None]]:
        """(worker, path of its link to the next hop) per stage of the data peer's first deployment, waiting
        until every path is known: the coordinator learns each from the stage's next status poll."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.get("data", f"{self.nodes['data'].url}/api/v1/pipeline/status")
            links = [(s["worker"], s["link"]) for s in status["deployments"][0]["stages"]]  # type: ignore[index]
            if all(link is not None for _, link in links) or time.monotonic() > deadline:
                return links
            time.sleep(0.5)

    def wait_directory(self, timeout: float = 60.0) -> None:
        """Until the data peer's table lists the workers (learned from the relay)."""
        deadline = time.monotonic() + timeout
        names: set[str] = set()
        while time.monotonic() < deadline:
            doc = self.get("data", f"{self.nodes['data'].url}/api/v1/peers")
            names = {p["name"] for p in doc["peers"]}  # type: ignore[index]
            if names >= set(self.workers):
                return
            time.sleep(0.5)
        raise LabError(f"the data peer sees only {sorted(names)} after {timeout} s")


# ---------------------------------------------------------------------------------------------- forwarder


def forward(ports: Sequence[str], wan: set[str], delay_s: float) -> None:
    """Bridge Ethernet frames between `ports` (learning MACs), delayed `delay_s` per WAN port crossed.

    A frame's delay counts from the kernel's receive timestamp (SO_TIMESTAMPNS), so a frame read late is not
    held late. poll() waits in whole milliseconds: it is asked to wake before the next frame is due and the
    rest (under a millisecond) is slept, so the thread never spins. (Rounding the wait down and polling
    again spun for the last millisecond of every queued frame: with 20 ms of delay that took most of a core
    from the nodes being measured.)"""
    _like_hardware()
    socks: dict[str, socket.socket] = {}
    for port in ports:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind((port, 0))
        s.setblocking(False)
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        with contextlib.suppress(OSError):  # else every frame sent wakes us once more, to be thrown away
            s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        with contextlib.suppress(OSError):  # root: past rmem_max, so a burst is queued, not dropped unseen
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCKET_BUFFER)
        socks[port] = s
    by_fd = {s.fileno(): p for p, s in socks.items()}
    mac_port: dict[bytes, str] = {}
    queue: list[tuple[float, int, str, bytes]] = []
    seq = 0
    dropped = 0
    late = array.array("d")  # how late each delayed frame went out (s), the first MAX_LATE of them
    poller = select.poll()
    for s in socks.values():
        poller.register(s, select.POLLIN)
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    def on_usr1(*_: object) -> None:  # Lab.reset_forwarder_stats: report from here on
        nonlocal late, dropped
        late, dropped = array.array("d"), 0

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGUSR1, on_usr1)
    while not stop:
        now = time.time()  # the kernel's receive timestamps are wall-clock time
        while queue and queue[0][0] <= now:
            due, _, out, frame = heapq.heappop(queue)
            with contextlib.suppress(OSError):
                socks[out].send(frame)
            if delay_s > 0 and len(late) < MAX_LATE:
                late.append(time.time() - due)
        timeout_ms = 200
        if queue:
            wait = queue[0][0] - now
            if wait < 0.001:
                time.sleep(wait)  # the last fraction of a millisecond (arrivals keep their timestamps)
                continue
            timeout_ms = min(200, int(wait * 1000))  # rounded down: wake before it is due, then sleep
        for fd, _ in poller.poll(timeout_ms):
            in_port = by_fd[fd]
            while True:
                try:
                    frame, anc, _flags, meta = socks[in_port].recvmsg(65535, 64)
                except BlockingIOError:
                    break
                if meta[2] == PACKET_OUTGOING or len(frame) < 14:
                    continue
                dst, src = frame[:6], frame[6:12]
                mac_port[src] = in_port
                outs = [mac_port[dst]] if dst in mac_port else [p for p in socks if p != in_port]
                arrival = _kernel_time(anc) or time.time()
                for out in outs:
                    if out == in_port:
                        continue
                    delay = delay_s * ((in_port in wan) + (out in wan))
                    if len(queue) >= MAX_QUEUE:
                        dropped += 1
                        continue
                    seq += 1
                    heapq.heappush(queue, (arrival + delay, seq, out, frame))
    if late:
        q = sorted(late)
        median, p90, p99 = (q[len(q) * k // 100] * 1e6 for k in (50, 90, 99))
        print(f"forwarder: {len(q)} delayed frames went out late by median {median:.0f} us, p90 {p90:.0f}, "
              f"p99 {p99:.0f}", file=sys.stderr)  # fmt: skip
    if dropped:
        print(f"forwarder: dropped {dropped} frames (queue full)", file=sys.stderr)
    for port, sock in socks.items():  # frames the kernel dropped before we read them (socket buffer full)
        with contextlib.suppress(OSError):
            _packets, drops = PACKET_STATS.unpack(sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
            if drops:
                print(f"forwarder: {port}: the kernel dropped {drops} frames", file=sys.stderr)


def forwarder_binary() -> str | None:
    """forward.c built with the system's C compiler (once per version of the source, cached), or None: no
    compiler, a failed build, or ELDRIC_NATLAB_FORWARDER=python; the lab then runs `forward` below."""
    if os.environ.get("ELDRIC_NATLAB_FORWARDER", "").lower() == "python":
        return None
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "forward.c")
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None or not os.path.exists(source):
        return None
    with open(source, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    cache = os.path.join(os.path.expanduser("~"), ".cache", "eldric-p2p", "natlab")
    binary = os.path.join(cache, f"forward-{digest}")
    if os.access(binary, os.X_OK):
        return binary
    os.makedirs(cache, exist_ok=True)
    partial = f"{binary}.{os.getpid()}"
    built = subprocess.run([compiler, "-O2", "-o", partial, source], capture_output=True, text=True)
    if built.returncode != 0:
        print(f"natlab: forward.c did not build, using the Python forwarder: {built.stderr.strip()[-500:]}",
              file=sys.stderr)  # fmt: skip
        return None
    os.replace(partial, binary)
    return binary


def _like_hardware() -> None:
    """Run the forwarder like the wire it stands in for. At real-time priority: a frame is not held back while
    the nodes being measured compute on every core (a real link does not wait for their CPU; the kernel's RT
    throttling still leaves them 5% of each second should the forwarder ever spin). With a 1 ns timer slack:
    its sub-millisecond sleeps end when asked, not up to 50 us later. Best effort (needs root)."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(FIFO_PRIORITY))
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)


def _kernel_time(ancillary: list[tuple[int, int, bytes]]) -> float | None:
    """The receive time the kernel stamped on a frame (SCM_TIMESTAMPNS), in seconds, or None."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = TIMESPEC.unpack_from(data)
            return sec + nsec / 1e9
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build the lab and start the delay forwarder (stays up until `down`)")
    up.add_argument("--prefix", default="elp")
    up.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per WAN link")
    up.add_argument("--nat", choices=NAT_KINDS, default="masquerade", help="how the site routers map UDP")
    down = sub.add_parser("down", help="remove the lab")
    down.add_argument("--prefix", default="elp")
    fwd = sub.add_parser("forward", help="(internal) the delay bridge, run inside the inet namespace")
    fwd.add_argument("--delay-ms", type=float, default=0.0)
    fwd.add_argument("--wan", default="")
    fwd.add_argument("ports", nargs="+")
    args = parser.parse_args(argv)
    if args.cmd == "forward":
        forward(args.ports, set(filter(None, args.wan.split(","))), args.delay_ms / 1000)
        return 0
    if args.cmd == "down":
        Lab(prefix=args.prefix).down()
        return 0
    lab = Lab(prefix=args.prefix, delay_ms=args.delay_ms, nat=args.nat)
    lab.down()
    lab.up()
    print(
        f"lab up: {', '.join(lab_namespaces(lab.prefix))}; remove with: natlab.py down --prefix {lab.prefix}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
