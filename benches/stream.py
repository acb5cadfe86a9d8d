#!/usr/bin/env python3
"""Streamed answers over loopback: time to first byte and throughput of the demo's
`POST /completions` (server-sent events), on one running demo, in one run:

  keyless   no Idempotency-Key: the layer passes it through (the reference)
  original  a fresh key: the layer runs the handler and stores the stream
  replay    the same key again: the stored stream replayed
  joined    (a demo started with `--on-conflict join`) JOINERS duplicates sent while the
            original still streams: each follows it live
  remote    (a second demo on the same shared store, its URL the second argument) the same
            duplicates sent to the other instance: each follows the stream through the store

Two shapes, each ROUNDS times (default 3), scenarios interleaved, the median reported:
  paced  TOKENS_PACED events (default 1,000), one every INTERVAL_MS (default 2): what a client
         waits for its first event (a generation's pace);
  bulk   TOKENS_BULK events (default 100,000, about 2.5 MB) produced as fast as they are read:
         bytes per second.
Time to first byte is from the request's first byte sent to the first body byte received;
"total" to the body's end. Ratios are against keyless in the same round.

Usage: benches/stream.py http://127.0.0.1:PORT [http://127.0.0.1:OTHER]
(benches/stream.sh starts the demos)
Standard library only, one connection per request, HTTP/1.1.
"""

import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from urllib.parse import urlparse

ROUNDS = int(os.environ.get("ROUNDS", "3"))
JOINERS = int(os.environ.get("JOINERS", "10"))
TOKENS_PACED = int(os.environ.get("TOKENS_PACED", "1000"))
INTERVAL_MS = int(os.environ.get("INTERVAL_MS", "2"))
TOKENS_BULK = int(os.environ.get("TOKENS_BULK", "100000"))


async def post(host, port, body, key=None, extra=None):
    """One POST /completions; answers (status, headers, body bytes, ttfb s, total s)."""
    reader, writer = await asyncio.open_connection(host, port)
    payload = json.dumps(body).encode()
    lines = [
        "POST /completions HTTP/1.1",
        f"Host: {host}:{port}",
        "Authorization: Bearer bench",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
        "Connection: close",
    ]
    if key:
        lines.append(f"Idempotency-Key: {key}")
    for name, value in (extra or {}).items():
        lines.append(f"{name}: {value}")
    start = time.perf_counter()
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
    await writer.drain()
    raw = b""
    while b"\r\n\r\n" not in raw:
        data = await reader.read(65536)
        if not data:
            raise RuntimeError("connection closed before the head")
        raw += data
    head, rest = raw.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    ttfb = time.perf_counter() - start if rest else None
    chunks = [rest]
    while True:
        data = await reader.read(1 << 20)
        if not data:
            break
        if ttfb is None:
            ttfb = time.perf_counter() - start
        chunks.append(data)
    total = time.perf_counter() - start
    writer.close()
    raw_body = b"".join(chunks)
    if headers.get("transfer-encoding", "").lower() == "chunked":
        raw_body = dechunk(raw_body)
    return status, headers, raw_body, ttfb if ttfb is not None else total, total


def dechunk(data):
    out, at = [], 0
    while True:
        end = data.index(b"\r\n", at)
        size = int(data[at:end].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(data[end + 2 : end + 2 + size])
        at = end + 2 + size + 2


def expected(tokens):
    return "".join(f"id: {n}\ndata: tok-{n}\n\n" for n in range(1, tokens + 1)).encode()


async def scenario(host, port, name, body, key, joinable, other=None):
    """Runs one scenario; answers a list of (ttfb, total, bytes) samples (joined: one each)."""
    want = expected(body["tokens"])
    if name in ("joined", "remote"):
        original = asyncio.create_task(post(host, port, body, key))
        # The joiners arrive once the original streams (a tenth of its pace in).
        await asyncio.sleep(body["tokens"] * body["interval_ms"] / 10000)
        jhost, jport = other if name == "remote" else (host, port)
        results = await asyncio.gather(*(post(jhost, jport, body, key) for _ in range(JOINERS)))
        first = await original
        assert first[2] == want, "original cut"
        samples = []
        for status, headers, got, ttfb, total in results:
            if status != 200 or not joinable:
                return None
            assert got == want, f"a joiner got {len(got)} bytes, not {len(want)}"
            samples.append((ttfb, total, len(got)))
        return samples
    status, headers, got, ttfb, total = await post(
        host, port, body, key if name != "keyless" else None
    )
    assert status == 200, f"{name}: {status}"
    assert got == want, f"{name}: {len(got)} bytes, not {len(want)}"
    if name == "replay":
        assert headers.get("idempotent-replayed") == "true"
    return [(ttfb, total, len(got))]


async def main():
    url = urlparse(sys.argv[1])
    host, port = url.hostname, url.port
    other = None
    if len(sys.argv) > 2:
        second = urlparse(sys.argv[2])
        other = (second.hostname, second.port)
    joinable = os.environ.get("JOIN", "0") == "1"
    shapes = {
        "paced": {"tokens": TOKENS_PACED, "interval_ms": INTERVAL_MS},
        "bulk": {"tokens": TOKENS_BULK, "interval_ms": 0},
    }
    table = {}
    for round_ in range(ROUNDS):
        for shape, body in shapes.items():
            key = f"stream-{uuid.uuid4().hex}"
            names = ["keyless", "original", "replay"]
            if round_ % 2:
                names = ["original", "replay", "keyless"]
            row = {}
            for name in names:
                row[name] = await scenario(host, port, name, body, key, joinable)
            if shape == "paced":
                row["joined"] = await scenario(
                    host, port, "joined", body, f"join-{uuid.uuid4().hex}", joinable
                )
                if other:
                    row["remote"] = await scenario(
                        host, port, "remote", body, f"remote-{uuid.uuid4().hex}", joinable, other
                    )
            ref = statistics.median(s[0] for s in row["keyless"])
            ref_total = statistics.median(s[1] for s in row["keyless"])
            for name, samples in row.items():
                if samples is None:
                    continue
                ttfb = statistics.median(s[0] for s in samples)
                total = statistics.median(s[1] for s in samples)
                size = samples[0][2]
                table.setdefault((shape, name), []).append(
                    (ttfb, total, size / total, ttfb / ref, total / ref_total)
                )
            print(f"round {round_ + 1} {shape}: done", file=sys.stderr)
    print(f"{ROUNDS} rounds; paced: {TOKENS_PACED} events every {INTERVAL_MS} ms; bulk: "
          f"{TOKENS_BULK} events unpaced; joined: {JOINERS} duplicates; medians")
    print(f"{'shape':6} {'scenario':9} {'first byte ms':>14} {'total ms':>10} {'MB/s':>8} "
          f"{'first/keyless':>14} {'total/keyless':>14}")
    for (shape, name), rows in table.items():
        med = [statistics.median(r[i] for r in rows) for i in range(5)]
        print(f"{shape:6} {name:9} {med[0] * 1e3:14.2f} {med[1] * 1e3:10.1f} "
              f"{med[2] / 1e6:8.1f} {med[3]:14.2f} {med[4]:14.2f}")
    if not joinable:
        print("joined: not measured (start the demo with --on-conflict join and JOIN=1)")


if __name__ == "__main__":
    asyncio.run(main())
