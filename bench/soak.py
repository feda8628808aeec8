"""Connect/disconnect churn against one gateway node: accepted, refused and abruptly reset connections.

    .venv/bin/python bench/soak.py                          # 100,000 cycles or 10 minutes, whichever ends first
    .venv/bin/python bench/soak.py --cycles 5000 --kinds refused   # a burst of refused connections only
    .venv/bin/python bench/soak.py --smoke                  # a few seconds, to prove the script still runs

The node is `uvicorn asgi:app` pinned to core 0 with metrics on; this process (core 1) speaks raw WebSocket, so
each cycle costs the load generator little. Every 10,000 cycles it prints the node's RSS, open file descriptors and
`gateway_connections`; at the end it waits for the connections to end and prints the first and last samples as a
Markdown table. tests/test_hostile.py runs `churn` in-process for 10,000 cycles and checks the server's maps too.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import socket
import struct
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Callable

from harness import SECRET, free_port, rss_bytes, start_node, wait_for

from auth import mint_token

KINDS = ("accepted", "refused", "reset")


def client_frame(text: str | bytes, opcode: int = 0x1) -> bytes:
    """One masked WebSocket frame (text unless `opcode` says otherwise), as a client must send it."""
    data, mask = text.encode() if isinstance(text, str) else text, os.urandom(4)
    length = bytes([0x80 | len(data)]) if len(data) < 126 else bytes([0x80 | 126]) + struct.pack("!H", len(data))
    return bytes([0x80 | opcode]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


CLOSE_FRAME = bytes([0x88, 0x82]) + b"\0\0\0\0" + struct.pack("!H", 1000)  # masked with zeros, status 1000


async def raw_websocket(url: str, receive_buffer: int = 1 << 16) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket connection to the Engine.IO endpoint of the gateway at `url`, with this kernel receive buffer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    if not answer.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(answer.decode(errors="replace"))
    return reader, writer


async def server_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The opcode and payload of the next frame the server sends (server frames are not masked)."""
    opcode, length = await reader.readexactly(2)
    length &= 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    return opcode & 0x0F, await reader.readexactly(length)


async def server_text(reader: asyncio.StreamReader) -> str:
    """The next text frame the server sends."""
    opcode, data = await server_frame(reader)
    if opcode != 1:
        raise ConnectionError(f"expected a text frame, got opcode {opcode}")
    return data.decode()


async def cycle(url: str, kind: str, user_id: str) -> None:
    """One connection of `kind`: accepted and left politely, refused for a forged token, or accepted and reset."""
    reader, writer = await raw_websocket(url)
    try:
        assert (await server_text(reader)).startswith("0{"), "no Engine.IO OPEN packet"
        secret = SECRET if kind != "refused" else "forged-" + SECRET
        writer.write(client_frame("40" + json.dumps({"token": mint_token(user_id, secret, 60)})))
        answer = await asyncio.wait_for(server_text(reader), 10)
        expected = "44" if kind == "refused" else "40"
        if not answer.startswith(expected):
            raise AssertionError(f"{kind}: expected a {expected} packet, got {answer[:80]!r}")
        if kind == "accepted":
            writer.write(client_frame("41") + CLOSE_FRAME)  # Socket.IO DISCONNECT, then a WebSocket close
            await writer.drain()
        elif kind == "reset":  # SO_LINGER 0: close() sends RST, as a client vanishing mid-connection would
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        writer.close()


async def churn(
    url: str,
    cycles: int,
    concurrency: int = 20,
    until: Callable[[], bool] = lambda: False,
    kinds: tuple[str, ...] = KINDS,
) -> Counter[str]:
    """Run up to `cycles` cycles (`kinds` in turn, seven users) with `concurrency` in flight, or `until()` holds."""
    numbers = itertools.count()
    done: Counter[str] = Counter()

    async def worker() -> None:
        while (n := next(numbers)) < cycles and not until():
            kind = kinds[n % len(kinds)]
            await cycle(url, kind, f"user{n % 7}")
            done[kind] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def connections_gauge(url: str) -> float:
    """`gateway_connections` from the node's /metrics."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("gateway_connections "))


def sample(node: subprocess.Popen[str], url: str, cycles: int, seconds: float) -> tuple[int, float, int, int, float]:
    return cycles, seconds, rss_bytes(node.pid), open_files(node.pid), connections_gauge(url)


async def soak(cycles: int, minutes: float, report_every: int, kinds: tuple[str, ...] = KINDS) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    node = start_node(port, {"GATEWAY_METRICS": "1", "GATEWAY_LOG_LEVEL": "warning"})
    try:
        await churn(url, 300)  # warm up: imports, caches and python-socketio's lazily started tasks
        await wait_for(lambda: connections_gauge(url) == 0, "warm-up connections to end")
        samples = [sample(node, url, 0, 0.0)]
        started = time.monotonic()
        deadline = started + 60 * minutes
        total: Counter[str] = Counter()
        while sum(total.values()) < cycles and time.monotonic() < deadline:
            batch = min(report_every, cycles - sum(total.values()))
            total += await churn(url, batch, until=lambda: time.monotonic() > deadline, kinds=kinds)
            samples.append(sample(node, url, sum(total.values()), time.monotonic() - started))
            done, seconds, rss, fds, connections = samples[-1]
            print(f"{done:,} cycles  {seconds:.0f} s  RSS {rss / 2**20:.1f} MiB  fds {fds}  connections {connections:g}")
        await wait_for(lambda: connections_gauge(url) == 0, "the last connections to end")
        samples.append(sample(node, url, sum(total.values()), time.monotonic() - started))
        print(f"\n{dict(total)} in {samples[-1][1]:.0f} s ({samples[-1][0] / samples[-1][1]:.0f} cycles/s)\n")
        print("| after cycles | seconds | node RSS (MiB) | open fds | gateway_connections |")
        print("|---|---|---|---|---|")
        for done, seconds, rss, fds, connections in (samples[0], samples[1], samples[-1]):
            print(f"| {done:,} | {seconds:.0f} | {rss / 2**20:.1f} | {fds} | {connections:g} |")
        if samples[-1][3] > samples[0][3]:
            raise SystemExit("file descriptors were left behind")
    finally:
        node.terminate()
        node.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100_000)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated, of " + ", ".join(KINDS))
    parser.add_argument("--smoke", action="store_true", help="600 cycles")
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})  # the node has core 0
    if args.smoke:
        args.cycles = 600
    kinds = tuple(args.kinds.split(","))
    if not set(kinds) <= set(KINDS):
        parser.error(f"--kinds takes {', '.join(KINDS)}")
    asyncio.run(soak(args.cycles, args.minutes, report_every=200 if args.smoke else 10_000, kinds=kinds))


if __name__ == "__main__":
    main()
