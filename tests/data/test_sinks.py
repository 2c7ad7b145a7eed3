from __future__ import annotations

import hashlib
import random
import threading
from pathlib import Path

import eldric_p2p.data.sinks as sinks
from eldric_p2p.data.gguf_index import read_index
from eldric_p2p.engine.synthetic import write_synthetic_gguf


def test_tensors_hashed_in_order_whatever_order_bytes_land(tmp_path: Path) -> None:
    """The shard writer hashes each tensor front to back while pieces arrive out of order from threads."""
    src = write_synthetic_gguf(tmp_path / "m.gguf", arch="llama", hidden=256, ffn=512)
    ix = read_index(src)
    data = src.read_bytes()
    dst = tmp_path / "copy.gguf"
    dst.write_bytes(bytes(len(data)))
    tensors = ix.assignment_tensors(0, 4)
    first, last = min(t.offset for t in tensors), max(t.end for t in tensors)
    cuts = sorted({first, last, *random.Random(7).sample(range(first, last), 200)})
    pieces = list(zip(cuts[:-1], cuts[1:], strict=True))
    random.Random(8).shuffle(pieces)
    writer = sinks.ShardWriter(dst, tensors)

    def write_some(part: list[tuple[int, int]]) -> None:
        for a, b in part:
            writer.write(a, memoryview(data)[a:b])

    threads = [threading.Thread(target=write_some, args=(pieces[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.close()
    assert writer.digests() == {t.name: hashlib.sha256(data[t.offset : t.end]).hexdigest() for t in tensors}
