"""Capacity: many idle WebSocket connections on one process, their memory and the server's CPU while idle.

    .venv/bin/python bench/idle.py                       # 10,000 connections, 60 s idle, 3 interleaved rounds
    .venv/bin/python bench/idle.py --gateway-env GATEWAY_RECOVERY_SECONDS=60   # adds that gateway as a column
    .venv/bin/python bench/idle.py --smoke               # a few seconds, to prove the script still runs

The servers are bench/fanout.py's: the gateway as `./run start` runs it, bare python-socketio with the same
settings, and Node's Socket.IO 4 with its defaults, each its own process on core 0. This process, on core 1, holds the
connections as raw WebSockets (bench/soak.py's `raw_websocket`, no permessage-deflate offered, 100 handshakes in
flight): after the Socket.IO CONNECT it only answers Engine.IO pings ("2" with "3", every 25 s by default) and
uvicorn's WebSocket pings (every 20 s), and every connection must still be open at the end.
RSS per connection is (RSS with all connections - RSS with the first 100) / (connections - 100), taken at the end of
the idle window; idle CPU is the server's CPU time over that window. It raises this process's file-descriptor limit
to the hard limit (servers inherit it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import time
from collections import Counter

from fanout import NO_DEFLATE, NODE, Setup, gateway_with, print_table, serving
from harness import SECRET, cpu_seconds, rss_bytes
from soak import client_frame, raw_websocket, server_frame, server_text

from auth import mint_token

SETUPS = {
    "gateway, ./run start": Setup("gateway", env=NO_DEFLATE),
    "bare python-socketio": Setup("bare", env=NO_DEFLATE),
    NODE: Setup("node", server="node"),
}
RATIOS = [("gateway, ./run start", "bare python-socketio"), ("gateway, ./run start", NODE)]
WARM = 100  # connections opened before the baseline RSS: imports and caches the first clients fill


async def open_connection(url: str, setup: Setup, n: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """One raw WebSocket that completed the Socket.IO CONNECT as user{n}."""
    reader, writer = await asyncio.wait_for(raw_websocket(url, receive_buffer=4096), 30)
    if not (await asyncio.wait_for(server_text(reader), 30)).startswith("0{"):
        raise ConnectionError("no Engine.IO OPEN packet")
    auth = {"user": f"user{n}"} if setup.app == "bare" else {"token": mint_token(f"user{n}", SECRET, 3600)}
    writer.write(client_frame("40" + json.dumps(auth)))
    if not (answer := await asyncio.wait_for(server_text(reader), 30)).startswith("40"):
        raise ConnectionError(f"connection refused: {answer[:80]!r}")
    return reader, writer


async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, events: Counter[str]) -> None:
    """Answer pings until the server closes the connection or the task is cancelled at the end of the round."""
    try:
        while True:
            opcode, data = await server_frame(reader)
            if opcode == 0x1 and data == b"2":
                writer.write(client_frame("3"))
                events["Engine.IO pings"] += 1
            elif opcode == 0x9:
                writer.write(client_frame(data, 0xA))
                events["WebSocket pings"] += 1
            elif opcode == 0x8:
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    events["closed by the server"] += 1


async def one_round(setup: Setup, connections: int, idle_seconds: float) -> dict[str, float]:
    events: Counter[str] = Counter()
    holders: list[asyncio.Task[None]] = []
    writers: list[asyncio.StreamWriter] = []

    async def open_many(first: int, last: int) -> None:
        for start in range(first, last, 100):
            batch = range(start, min(start + 100, last))
            pairs = await asyncio.gather(*(open_connection(url, setup, n) for n in batch))
            for reader, writer in pairs:
                writers.append(writer)
                holders.append(asyncio.create_task(hold(reader, writer, events)))

    with serving(setup) as (server, url):
        try:
            await open_many(0, WARM)
            await asyncio.sleep(1)  # a pause for the first connections' handshakes to finish on the server
            rss_base, started = rss_bytes(server.pid), time.monotonic()
            await open_many(WARM, connections)
            connect_seconds = time.monotonic() - started
            cpu_before = cpu_seconds(server.pid)
            await asyncio.sleep(idle_seconds)
            idle_cpu, rss = cpu_seconds(server.pid) - cpu_before, rss_bytes(server.pid)
            if events["closed by the server"]:
                raise SystemExit(f"{events['closed by the server']} connections were closed while idle")
        finally:
            for task in holders:
                task.cancel()
            for writer in writers:
                writer.close()
    return {
        "connect_seconds": connect_seconds,
        "rss_mib": rss / 2**20,
        "kib_per_connection": (rss - rss_base) / (connections - WARM) / 1024,
        "idle_core_percent": 100 * idle_cpu / idle_seconds,
        "idle_us_per_connection_s": 1e6 * idle_cpu / idle_seconds / connections,
        "engineio_pings": events["Engine.IO pings"],
        "websocket_pings": events["WebSocket pings"],
    }


ROWS = [
    ("connections opened (after the first 100), seconds", "connect_seconds", "{:.1f}"),
    ("server RSS with all connections (MiB)", "rss_mib", "{:,.1f}"),
    ("server RSS per connection (KiB)", "kib_per_connection", "{:.1f}"),
    ("idle server CPU (% of one core)", "idle_core_percent", "{:.2f}"),
    ("idle server CPU per connection (µs per second)", "idle_us_per_connection_s", "{:.3f}"),
    ("Engine.IO / WebSocket pings answered in the window", ("engineio_pings", "websocket_pings"), "{:,.0f} / {:,.0f}"),
]


def raise_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(f"{needed} connections need {needed} file descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"file-descriptor limit: {soft}, set to the hard limit {hard} for this process and the servers it starts")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000, help="default 10,000 (at most 25,000)")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="the window CPU is measured over")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--gateway-env", action="append", metavar="GATEWAY_NAME=VALUE",
                        help="add a column: ./run start with these settings (repeatable: one column for all)")
    parser.add_argument("--smoke", action="store_true", help="150 connections, 2 s idle, one round")
    args = parser.parse_args()
    if args.smoke:
        args.connections, args.idle_seconds, args.rounds = WARM + 50, 2.0, 1
    if not WARM < args.connections <= 25_000:  # one 127.0.0.1 address: about 28,000 ephemeral ports
        parser.error(f"--connections must be between {WARM + 1} and 25,000")
    os.sched_setaffinity(0, {1})  # the servers have core 0
    raise_file_limit(args.connections + 1000)
    setups, ratios = dict(SETUPS), list(RATIOS)
    if args.gateway_env:
        name, setups[name] = gateway_with(args.gateway_env)
        ratios.append((name, "gateway, ./run start"))
    results: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, setup in setups.items():
            results[name].append(await one_round(setup, args.connections, args.idle_seconds))
    medians = {s: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for s, runs in results.items()}
    print(f"{args.connections:,} idle connections on one server process, {args.idle_seconds:.0f} s window; medians of "
          f"{args.rounds} interleaved rounds; {time.strftime('%Y-%m-%d')}")
    print_table(medians, ratios, ROWS)


if __name__ == "__main__":
    asyncio.run(main())
