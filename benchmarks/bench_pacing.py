"""How long a pipeline frame takes to arrive whole over a WAN link, with a pacing TCP congestion control and
without (eldric_p2p/net/pacing.py).

    sudo python benchmarks/bench_pacing.py [--delay-ms 20] [--sizes 3662,16400] [--frames 40]

Builds the NAT lab (tunnel/natlab.py) with `--delay-ms` per WAN link and sends frames of each size from a1
(behind site A's NAT) to a server on the relay host, one every 110 ms (a decode step's rhythm), on a socket
with the system's default congestion control and on one that `pacing.unpace` switched before connecting (what
links and the relay's lane do). The server prints the median and p90 time from a frame's first byte to its
last. 3662 bytes is a Qwen2.5-0.5B hidden state in f32 with its frame header and TLS record; 16400 one of a
4096-wide model.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tunnel"))
PORT = 9555
GAP_S = 0.110


def serve(rounds: int) -> None:
    """Accept one connection per (mode, size) and print the spread of each frame's arrival."""
    listener = socket.create_server(("0.0.0.0", PORT))
    for _ in range(rounds):
        conn, _ = listener.accept()
        mode, size = conn.recv(64).decode().strip().split("|")
        size_i = int(size)
        conn.sendall(b"k")
        spreads, buf, first = [], 0, 0.0
        while data := conn.recv(1 << 20):
            if buf == 0:
                first = time.perf_counter()
            buf += len(data)
            while buf >= size_i:
                buf -= size_i
                spreads.append((time.perf_counter() - first) * 1000)
                first = time.perf_counter()
        spreads = sorted(spreads[3:])  # the first frames ride the handshake's fresh window
        p90 = spreads[len(spreads) * 9 // 10]
        print(f"{mode:>24} {size_i:>7} B: first to last byte median {statistics.median(spreads):6.2f} ms, "
              f"p90 {p90:6.2f} ms ({len(spreads)} frames)", flush=True)  # fmt: skip


def send(host: str, size: int, frames: int, unpaced: bool) -> None:
    sys.path.insert(0, str(ROOT))
    from eldric_p2p.net.pacing import congestion_control, unpace

    sock = socket.socket()
    cc = unpace(sock) if unpaced else congestion_control(sock)
    sock.connect((host, PORT))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(f"{'unpaced' if unpaced else 'default'} ({cc})|{size}".encode().ljust(64))
    sock.recv(1)
    for _ in range(frames):
        sock.sendall(b"x" * size)
        time.sleep(GAP_S)
    sock.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay per WAN link")
    ap.add_argument("--sizes", default="3662,16400")
    ap.add_argument("--frames", type=int, default=40)
    sub = ap.add_subparsers(dest="role")
    srv = sub.add_parser("serve")
    srv.add_argument("rounds", type=int)
    cli = sub.add_parser("send")
    cli.add_argument("host")
    cli.add_argument("size", type=int)
    cli.add_argument("--unpaced", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.role == "serve":
        serve(args.rounds)
        return 0
    if args.role == "send":
        send(args.host, args.size, args.frames, args.unpaced)
        return 0

    import natlab

    if (why := natlab.missing_requirements()) is not None:
        raise SystemExit(why)
    me = [sys.executable, str(Path(__file__).resolve())]
    gap_ms = GAP_S * 1000
    print(f"NAT lab, {args.delay_ms:g} ms per WAN link; a1 -> relay host, one frame every {gap_ms:.0f} ms")
    with natlab.natlab(prefix="elpp", delay_ms=args.delay_ms, nat="symmetric") as lab:
        server = lab.popen("relay", [*me, "serve", str(2 * len(sizes))], stdout=subprocess.PIPE)
        time.sleep(1.0)
        for size in sizes:
            for unpaced in (False, True):
                flag = ["--unpaced"] if unpaced else []
                lab.exec("a1", *me, "--frames", str(args.frames), "send", lab.addr("relay"), str(size), *flag)
        out, _ = server.communicate(timeout=60)
        print(out, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
