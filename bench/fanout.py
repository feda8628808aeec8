"""The gateway against bare python-socketio and Node's Socket.IO, interleaved in one run.

    .venv/bin/python bench/fanout.py                    # the main table: 3 interleaved rounds, medians
    .venv/bin/python bench/fanout.py --table clients    # clients that do not offer permessage-deflate
    .venv/bin/python bench/fanout.py --table servers    # the gateway under other ASGI servers and options
    .venv/bin/python bench/fanout.py --table workers    # one uvicorn worker against two, through Redis
    .venv/bin/python bench/fanout.py --table profile --profile DIR   # py-spy: where the server's time goes
    .venv/bin/python bench/fanout.py --smoke            # a few seconds, to prove the script still runs

`--table servers` and `--profile` need `.venv/bin/pip install -r bench/requirements.txt` (granian, wsproto,
py-spy); the Node rows need `npm ci --prefix bench` (`./run test` does both Node installs); `--table workers`
needs redis-server. BENCH_PYTHON=/path/to/other/venv/bin/python runs the Python servers under another interpreter.
Each server runs as its own process on core 0
(bench/apps.py, bench/node_server.mjs); the load generator is the official socket.io-client in one Node process
on core 1 (bench/loadgen.mjs), offering permessage-deflate as browsers do unless a setup says otherwise.
Figures: connections/s (2,000 to a fresh server, 100 in flight); then, with 1,000 clients, delivered msgs/s for
fan-out (broadcasts of ~100 bytes) and targeted (emit_to_user spread over all users), emit-to-receipt latency at
light load (one emit every 5 ms), server RSS per idle connection, server CPU µs per delivered message, and each
side's CPU. Nothing may be lost: the load
generator counts every message and a phase that does not complete fails the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness import ROOT, SECRET, cpu_seconds, free_port, rss_bytes, start_redis, start_server

from auth import mint_token


PHASES = ("connect", "fan-out", "targeted")  # the phases --profile records
PY_SPY = str(Path(sys.executable).parent / "py-spy")  # from bench/requirements.txt


def start_py_spy(pid: int, output: Path) -> subprocess.Popen[bytes]:
    command = [PY_SPY, "record", "--pid", str(pid), "--rate", "500", "--format", "raw", "--nonblocking"]
    return subprocess.Popen([*command, "--output", str(output)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_py_spy(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(signal.SIGINT)  # py-spy writes its samples and exits
    spy.wait(60)


def post(url: str, job: dict) -> None:
    request = urllib.request.Request(f"{url}/bench/emit", json.dumps(job).encode(), method="POST")
    urllib.request.urlopen(request, timeout=600).read()


class LoadGenerator:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def line(self) -> dict:
        return json.loads(await asyncio.wait_for(self.process.stdout.readline(), 300))

    async def measure(self, url: str, job: dict, expect: int, server_pid: int, profile: Path | None = None) -> dict:
        """Run `job` on the server and wait for `expect` messages; with `profile`, py-spy records the server."""
        self.process.stdin.write(json.dumps({"expect": expect}).encode() + b"\n")
        await self.line()  # ready
        spy = profile and start_py_spy(server_pid, profile)
        cpu_before, own_before = cpu_seconds(server_pid), cpu_seconds(self.process.pid)
        await asyncio.to_thread(post, url, job)
        result = await self.line()
        if spy:
            stop_py_spy(spy)
        result["server_cpu"] = cpu_seconds(server_pid) - cpu_before
        result["loadgen_cpu"] = cpu_seconds(self.process.pid) - own_before
        return result


@dataclass(frozen=True)
class Setup:
    """One server under test: which app, under which server with which arguments, and what clients offer."""

    app: str  # "gateway" or "bare" (bench/apps.py), or "node" (bench/node_server.mjs)
    server: str = "uvicorn"  # uvicorn, hypercorn, granian or node
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    deflate: bool = True  # clients offer permessage-deflate, as browsers do
    cores: str = "0"  # the load generator has core 1

    def command(self, port: int) -> list[str]:
        factory = f"bench.apps:make_{self.app}_app"
        python = os.environ.get("BENCH_PYTHON", sys.executable)  # another interpreter's venv, to compare versions
        return {
            "uvicorn": [python, "-m", "uvicorn", factory, "--factory", "--port", str(port)],
            "hypercorn": [python, "-m", "hypercorn", f"{factory}()", "--bind", f"127.0.0.1:{port}"],
            "granian": [
                python, "-m", "granian", "--interface", "asgi", "--factory", "--port", str(port), factory
            ],
            "node": ["node", str(ROOT / "bench" / "node_server.mjs"), str(port)],
        }[self.server] + ["--log-level", "warning"][: 2 if self.server != "node" else 0] + list(self.args)


NO_DEFLATE = {"UVICORN_WS_PER_MESSAGE_DEFLATE": "false"}  # what ./run start sets
SERVER_ENV = {"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_LOG_LEVEL": "warning"}
RUN_START = Setup("gateway", env=NO_DEFLATE)
NODE = "Node Socket.IO"
REDIS_PORT = free_port()  # a redis-server for the setups that name it, started by main()
WITH_REDIS = {**NO_DEFLATE, "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{REDIS_PORT}/0"}

# Each table: its setups (columns) and the ratios it prints (numerator, denominator).
TABLES: dict[str, tuple[dict[str, Setup], list[tuple[str, str]]]] = {
    "main": (
        {
            "gateway": Setup("gateway"),
            "bare": Setup("bare"),
            "./run start": RUN_START,
            "bare, no deflate": Setup("bare", env=NO_DEFLATE),
            NODE: Setup("node", server="node"),
        },
        [
            ("gateway", "bare"),
            ("./run start", "bare, no deflate"),
            ("./run start", "bare"),
            ("./run start", NODE),
        ],
    ),
    "clients": (
        {
            "./run start": Setup("gateway", env=NO_DEFLATE, deflate=False),
            "bare": Setup("bare", deflate=False),
            NODE: Setup("node", server="node", deflate=False),
        },
        [("./run start", "bare"), ("./run start", NODE)],
    ),
    "profile": (
        {"./run start": RUN_START, "bare, no deflate": Setup("bare", env=NO_DEFLATE)},
        [("./run start", "bare, no deflate")],
    ),
    "workers": (
        {
            "1 worker": RUN_START,
            "1 worker + Redis": Setup("gateway", env=WITH_REDIS),
            "2 workers + Redis": Setup("gateway", env=WITH_REDIS, args=("--workers", "2"), cores="0,1"),
        },
        [("2 workers + Redis", "1 worker + Redis"), ("2 workers + Redis", "1 worker")],
    ),
    "servers": (
        {
            "uvicorn (./run start)": RUN_START,
            "uvicorn --ws websockets-sansio": Setup("gateway", env=NO_DEFLATE, args=("--ws", "websockets-sansio")),
            "uvicorn --ws wsproto": Setup("gateway", env=NO_DEFLATE, args=("--ws", "wsproto")),
            "uvicorn --loop asyncio --http h11": Setup(
                "gateway", env=NO_DEFLATE, args=("--loop", "asyncio", "--http", "h11")
            ),
            "hypercorn": Setup("gateway", server="hypercorn"),
            "granian": Setup("gateway", server="granian"),
        },
        [("granian", "uvicorn (./run start)"), ("hypercorn", "uvicorn (./run start)")],
    ),
}


async def start_load_generator(url: str, setup: Setup, users: int) -> tuple[LoadGenerator, dict]:
    """The Node load generator, once it has opened one connection per user; with what it said about that."""
    auths = [{"user": f"user{n}"} if setup.app == "bare" else {"token": mint_token(f"user{n}", SECRET)}
             for n in range(users)]
    with tempfile.NamedTemporaryFile("w", suffix=".json") as auth_file:
        json.dump(auths, auth_file)
        auth_file.flush()
        process = await asyncio.create_subprocess_exec(
            "taskset", "-c", "1", "node", str(ROOT / "bench" / "loadgen.mjs"), url, auth_file.name,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env=os.environ | {"DEFLATE": "1" if setup.deflate else "0"},
        )
        loadgen = LoadGenerator(process)
        connected = await loadgen.line()
    assert connected["connected"] == users and connected["failed"] == 0, connected
    return loadgen, connected


@contextlib.contextmanager
def serving(setup: Setup) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A fresh server for `setup` on its cores; yields (process, base URL) and stops it afterwards."""
    port = free_port()
    node = start_server(setup.command(port), port, SERVER_ENV | setup.env, setup.cores)
    try:
        yield node, f"http://127.0.0.1:{port}"
    finally:
        node.terminate()
        node.wait(30)


async def close(loadgen: LoadGenerator) -> None:
    loadgen.process.stdin.write(b'{"close": true}\n')
    await asyncio.wait_for(loadgen.process.wait(), 60)


async def connect_round(setup: Setup, connections: int, profile: Path | None = None) -> dict[str, float]:
    """A fresh server and `connections` authenticated connections, 100 in flight: their rate and server CPU."""
    with serving(setup) as (node, url):
        cpu_idle = cpu_seconds(node.pid)
        spy = profile and start_py_spy(node.pid, profile / "connect.txt")
        loadgen, connected = await start_load_generator(url, setup, connections)
        if spy:
            stop_py_spy(spy)
        cpu = cpu_seconds(node.pid) - cpu_idle
        await close(loadgen)
    return {"connections_per_s": connections / connected["seconds"], "us_per_connection": 1e6 * cpu / connections}


async def one_round(
    setup: Setup, connections: int, clients: int, broadcasts: int, targeted: int, singles: int,
    profile: Path | None = None,
) -> dict[str, float]:
    """One setup through every phase; with `profile`, py-spy records the PHASES into that folder."""
    result = await connect_round(setup, connections, profile)
    with serving(setup) as (node, url):
        rss_idle = rss_bytes(node.pid)
        loadgen, _ = await start_load_generator(url, setup, clients)
        try:
            per_connection = (rss_bytes(node.pid) - rss_idle) / clients
            fan = await loadgen.measure(url, {"kind": "fanout", "count": broadcasts, "users": clients},
                                        clients * broadcasts, node.pid, profile and profile / "fan-out.txt")
            tgt = await loadgen.measure(url, {"kind": "targeted", "count": targeted, "users": clients},
                                        targeted, node.pid, profile and profile / "targeted.txt")
            lat = await loadgen.measure(url, {"kind": "latency", "count": singles, "users": clients},
                                        singles, node.pid)
        finally:
            await close(loadgen)
    return result | {
        "fanout_msgs_per_s": fan["received"] / fan["seconds"],
        "fanout_server_cpu": fan["server_cpu"] / fan["seconds"],
        "fanout_loadgen_cpu": fan["loadgen_cpu"] / fan["seconds"],
        "fanout_us_per_msg": 1e6 * fan["server_cpu"] / fan["received"],
        "targeted_msgs_per_s": tgt["received"] / tgt["seconds"],
        "targeted_us_per_msg": 1e6 * tgt["server_cpu"] / tgt["received"],
        "targeted_server_cpu": tgt["server_cpu"] / tgt["seconds"],
        "p50_ms": lat["p50_ms"],
        "p99_ms": lat["p99_ms"],
        "kib_per_connection": per_connection / 1024,
    }


ROWS = [
    ("connections/s (fresh server, 100 in flight)", "connections_per_s", "{:,.0f}"),
    ("server CPU µs per connection", "us_per_connection", "{:,.0f}"),
    ("fan-out delivered msgs/s", "fanout_msgs_per_s", "{:,.0f}"),
    ("fan-out: server / load generator CPU (cores)", ("fanout_server_cpu", "fanout_loadgen_cpu"), "{:.2f} / {:.2f}"),
    ("fan-out server µs per delivered msg", "fanout_us_per_msg", "{:.1f}"),
    ("targeted delivered msgs/s", "targeted_msgs_per_s", "{:,.0f}"),
    ("targeted server µs per delivered msg", "targeted_us_per_msg", "{:.1f}"),
    ("targeted: server CPU (cores)", "targeted_server_cpu", "{:.2f}"),
    ("latency p50 (ms)", "p50_ms", "{:.2f}"),
    ("latency p99 (ms)", "p99_ms", "{:.2f}"),
    ("server RSS per idle connection (KiB)", "kib_per_connection", "{:.1f}"),
]


# Where a sample's innermost Python frame is decides its share (py-spy sees C code as the Python line calling it).
PROFILE_BUCKETS = [
    ("WebSocket framing and socket writes (uvicorn, websockets)", ("uvicorn/protocols/websockets/", "websockets/")),
    ("asyncio tasks (create_task, wait, wait_for)", ("asyncio/tasks.py",)),
    ("Engine.IO sockets, queues and writers", ("engineio/", "asyncio/queues.py", "asyncio/futures.py")),
    ("Socket.IO packets and manager", ("socketio/",)),
    ("the gateway's own code", ("(gateway.py:", "(auth.py:", "(asgi.py:")),
    ("event loop (uvloop)", ("asyncio/runners.py", "asyncio/base_events.py", "asyncio/events.py")),
]


def profile_shares(path: Path) -> dict[str, float]:
    """Share of py-spy's samples (raw format: `frame;frame;... count`) per bucket, by innermost frame."""
    counts = dict.fromkeys([bucket for bucket, _ in PROFILE_BUCKETS] + ["other (HTTP route, Starlette, json)"], 0)
    for line in path.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        leaf = stack.rsplit(";", 1)[-1]
        bucket = next((b for b, marks in PROFILE_BUCKETS if any(m in leaf for m in marks)), list(counts)[-1])
        counts[bucket] += int(count)
    total = sum(counts.values())
    return {bucket: count / total for bucket, count in counts.items()}


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"  # a smoke run's CPU time can be below the clock tick


async def profile(setups: dict[str, Setup], directory: Path, sizes: tuple[int, ...]) -> None:
    """One round per setup under py-spy, each phase's samples in DIR/<setup>/<phase>.txt; print the shares."""
    shares = {}
    for name, setup in setups.items():
        if setup.server != "node":
            folder = directory / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
            folder.mkdir(parents=True, exist_ok=True)
            await one_round(setup, *sizes, folder)
            shares |= {f"{name}, {phase}": profile_shares(folder / f"{phase}.txt") for phase in PHASES}
    print(f"| share of server samples | {' | '.join(shares)} |")
    print("|---" * (len(shares) + 1) + "|")
    for bucket in next(iter(shares.values())):
        print(f"| {bucket} | {' | '.join(f'{100 * s[bucket]:.0f} %' for s in shares.values())} |")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=TABLES, default="main")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="one round under py-spy, samples into DIR")
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})  # the servers have core 0
    setups, ratios = TABLES[args.table]
    sizes = (1, 40, 20, 5, 100, 20) if args.smoke else (3, 2000, 1000, 200, 20000, 500)
    rounds, connections, clients, broadcasts, targeted, singles = sizes
    redis = start_redis(REDIS_PORT) if any("GATEWAY_REDIS_URL" in setup.env for setup in setups.values()) else None
    try:
        if args.profile:
            await profile(setups, args.profile, sizes[1:])
            return
        results: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
        for _ in range(rounds):
            for name, setup in setups.items():
                results[name].append(await one_round(setup, connections, clients, broadcasts, targeted, singles))
    finally:
        if redis:
            redis.terminate()
    medians = {s: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for s, runs in results.items()}
    print(f"{connections} connections to a fresh server; then {clients} clients, {broadcasts} broadcasts, "
          f"{targeted} emit_to_user, {singles} single emits 5 ms apart; "
          f"medians of {rounds} interleaved rounds; {time.strftime('%Y-%m-%d')}")
    columns = [*setups, *(f"{a} / {b}" for a, b in ratios)]
    print(f"| figure | {' | '.join(columns)} |")
    print("|---" * (len(columns) + 1) + "|")
    for label, key, form in ROWS:
        keys = key if isinstance(key, tuple) else (key,)
        cells = [form.format(*(medians[s][k] for k in keys)) for s in setups]
        cells += [ratio(medians[a][key], medians[b][key]) if isinstance(key, str) else "" for a, b in ratios]
        print(f"| {label} | {' | '.join(cells)} |")
    print(f"| lost messages, failed connections | {' | '.join('0' for _ in setups)} |{' |' * len(ratios)}")


if __name__ == "__main__":
    asyncio.run(main())
