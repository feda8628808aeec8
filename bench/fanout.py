"""The gateway against bare python-socketio and Node's Socket.IO, interleaved in one run.

    .venv/bin/python bench/fanout.py                    # the main table: 3 interleaved rounds, medians
    .venv/bin/python bench/fanout.py --table clients    # clients that do not offer permessage-deflate
    .venv/bin/python bench/fanout.py --table servers    # the gateway under other ASGI servers and options
    .venv/bin/python bench/fanout.py --table workers    # one uvicorn worker against two, through Redis
    .venv/bin/python bench/fanout.py --table recovery   # ./run start with GATEWAY_RECOVERY_SECONDS=60 against without
    .venv/bin/python bench/fanout.py --table profile --profile DIR   # py-spy: where the server's time goes
    .venv/bin/python bench/fanout.py --smoke            # a few seconds, to prove the script still runs

Options for any table:
- `--gateway-env NAME=VALUE` (repeatable; one column for all) adds the gateway as `./run start` runs it with those
  GATEWAY_* settings (a setting the gateway does not know is ignored), or with BENCH_GC_THRESHOLD=700,10,30, the
  garbage-collection thresholds an application could set;
- `--gateway-tree DIR` adds the gateway's modules from another checkout (`git worktree add /tmp/before <commit>`),
  run as `./run start` runs it under this bench;
- `--gateway-python PATH` adds the gateway as `./run start` runs it under another virtual environment's interpreter
  (`./run test` makes `.venv-py312` and `.venv-py313`);
- `--counters` adds rows: full garbage collections while connecting, and packets per python-engineio writer wake-up
  (bench/apps.py counts both);
- `--rounds N` (default 3).

`--table servers` and `--profile` need `.venv/bin/pip install -r bench/requirements.txt` (granian, wsproto,
py-spy); the Node rows need `npm ci --prefix bench` (`./run test` does both Node installs); `--table workers`
needs redis-server. BENCH_PYTHON=/path/to/other/venv/bin/python runs the Python servers under another interpreter.
Each server runs as its own process on core 0
(bench/apps.py, bench/node_server.mjs); the load generator is the official socket.io-client in one Node process
on core 1 (bench/loadgen.mjs), offering permessage-deflate as browsers do unless a setup says otherwise.
Figures: connections/s (2,000 to a fresh server, 100 in flight); then, with 1,000 clients, delivered msgs/s for
fan-out (broadcasts of ~100 bytes) and targeted (emit_to_user spread over all users), emit-to-receipt latency at
light load (one emit every 5 ms), server RSS per idle connection, server CPU µs per delivered message, and each
side's CPU. Fan-out and targeted run twice: "burst", the emits awaited back to back, and "spaced", the route letting
the event loop turn SPACING times after each emit, so that each message is written by its own writer wake-up in
every server (the same work; see bench/apps.py). Nothing may be lost: the load generator counts every message and a
phase that does not complete fails the run.
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
from dataclasses import dataclass, field, replace
from pathlib import Path

from harness import ROOT, SECRET, cpu_seconds, free_port, rss_bytes, start_redis, start_server

from auth import mint_token


# Loop turns after each emit in the spaced phases. python-engineio's writer, woken by a packet, sends it two turns
# later on Python 3.11 (its `asyncio.wait_for` wraps `queue.get()` in a task): with 2, --counters already shows 1.00
# packet per wake-up for both Python servers; 3 leaves a margin.
SPACING = 3
# The delivery phases: name (the figures' key and py-spy's file), the route's kind, its spacing, the rows' label.
DELIVERY = [
    ("fan-out", "fanout", 0, "fan-out, burst"),
    ("fan-out-spaced", "fanout", SPACING, "fan-out, spaced"),
    ("targeted", "targeted", 0, "targeted, burst"),
    ("targeted-spaced", "targeted", SPACING, "targeted, spaced"),
]
PHASES = ("connect", *(phase for phase, *_ in DELIVERY))  # the phases --profile records
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


def get_json(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url, timeout=10).read())


class LoadGenerator:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def line(self) -> dict:
        return json.loads(await asyncio.wait_for(self.process.stdout.readline(), 300))

    async def measure(
        self, url: str, job: dict, expect: int, server_pid: int, profile: Path | None = None, counters: bool = False
    ) -> dict:
        """Run `job` on the server and wait for `expect` messages; with `profile`, py-spy records the server; with
        `counters`, count the packets per writer wake-up."""
        self.process.stdin.write(json.dumps({"expect": expect}).encode() + b"\n")
        await self.line()  # ready
        spy = profile and start_py_spy(server_pid, profile)
        before = counters and get_json(f"{url}/bench/counters")
        cpu_before, own_before = cpu_seconds(server_pid), cpu_seconds(self.process.pid)
        await asyncio.to_thread(post, url, job)
        result = await self.line()
        result["server_cpu"] = cpu_seconds(server_pid) - cpu_before
        result["loadgen_cpu"] = cpu_seconds(self.process.pid) - own_before
        if spy:
            stop_py_spy(spy)
        if before:
            after = get_json(f"{url}/bench/counters")
            packets, wakeups = (after[key] - before[key] for key in ("packets", "wakeups"))
            if wakeups:  # none when a server wrote every packet itself (the gateway before 05d0ad2)
                result["packets_per_wakeup"] = packets / wakeups
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
    python: str = ""  # the Python servers' interpreter: BENCH_PYTHON's, or this one's

    def command(self, port: int) -> list[str]:
        factory = f"bench.apps:make_{self.app}_app"
        python = self.python or os.environ.get("BENCH_PYTHON", sys.executable)  # another venv, to compare versions
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
RECOVERY = "GATEWAY_RECOVERY_SECONDS=60"  # connection state recovery; a gateway without it ignores the variable
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
    "recovery": ({"./run start": RUN_START}, []),  # main() adds the column: RECOVERY, or --gateway-env's settings
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


async def connect_round(
    setup: Setup, connections: int, profile: Path | None = None, counters: bool = False
) -> dict[str, float]:
    """A fresh server and `connections` authenticated connections, 100 in flight: their rate and server CPU; with
    `counters`, the server's full garbage collections meanwhile."""
    with serving(setup) as (node, url):
        cpu_idle = cpu_seconds(node.pid)
        before = counters and get_json(f"{url}/bench/counters")
        spy = profile and start_py_spy(node.pid, profile / "connect.txt")
        loadgen, connected = await start_load_generator(url, setup, connections)
        if spy:
            stop_py_spy(spy)
        cpu = cpu_seconds(node.pid) - cpu_idle
        after = counters and get_json(f"{url}/bench/counters")
        await close(loadgen)
    result = {"connections_per_s": connections / connected["seconds"], "us_per_connection": 1e6 * cpu / connections}
    if before and after:
        result["full collections"] = after["full_collections"] - before["full_collections"]
        result["full collection s"] = after["full_collection_seconds"] - before["full_collection_seconds"]
    return result


async def one_round(
    setup: Setup, connections: int, clients: int, broadcasts: int, targeted: int, singles: int,
    profile: Path | None = None, counters: bool = False,
) -> dict[str, float]:
    """One setup through every phase; with `profile`, py-spy records the PHASES into that folder; with `counters`,
    bench/apps.py's counters are read (Python servers only)."""
    counters = counters and setup.server != "node"
    result = await connect_round(setup, connections, profile, counters)
    with serving(setup) as (node, url):
        rss_idle = rss_bytes(node.pid)
        loadgen, _ = await start_load_generator(url, setup, clients)
        try:
            result["kib_per_connection"] = (rss_bytes(node.pid) - rss_idle) / clients / 1024
            for phase, kind, spacing, _ in DELIVERY:
                count = broadcasts if kind == "fanout" else targeted
                job = {"kind": kind, "count": count, "users": clients, "spacing": spacing}
                expect = clients * count if kind == "fanout" else count
                done = await loadgen.measure(url, job, expect, node.pid, profile and profile / f"{phase}.txt", counters)
                result |= {
                    f"{phase} msgs/s": done["received"] / done["seconds"],
                    f"{phase} server cores": done["server_cpu"] / done["seconds"],
                    f"{phase} loadgen cores": done["loadgen_cpu"] / done["seconds"],
                    f"{phase} µs/msg": 1e6 * done["server_cpu"] / done["received"],
                }
                if "packets_per_wakeup" in done:
                    result[f"{phase} packets/wake-up"] = done["packets_per_wakeup"]
            latency = await loadgen.measure(url, {"kind": "latency", "count": singles, "users": clients},
                                            singles, node.pid)
        finally:
            await close(loadgen)
    return result | {"p50_ms": latency["p50_ms"], "p99_ms": latency["p99_ms"]}


ROWS = [
    ("connections/s (fresh server, 100 in flight)", "connections_per_s", "{:,.0f}"),
    ("server CPU µs per connection", "us_per_connection", "{:,.0f}"),
    ("fan-out, burst: delivered msgs/s", "fan-out msgs/s", "{:,.0f}"),
    ("fan-out, burst: server / load generator CPU (cores)", ("fan-out server cores", "fan-out loadgen cores"),
     "{:.2f} / {:.2f}"),
    ("fan-out, burst: server µs per delivered msg", "fan-out µs/msg", "{:.1f}"),
    ("fan-out, spaced: server µs per delivered msg", "fan-out-spaced µs/msg", "{:.1f}"),
    ("targeted, burst: delivered msgs/s", "targeted msgs/s", "{:,.0f}"),
    ("targeted, burst: server CPU (cores)", "targeted server cores", "{:.2f}"),
    ("targeted, burst: server µs per delivered msg", "targeted µs/msg", "{:.1f}"),
    ("targeted, spaced: server µs per delivered msg", "targeted-spaced µs/msg", "{:.1f}"),
    ("latency p50 (ms)", "p50_ms", "{:.2f}"),
    ("latency p99 (ms)", "p99_ms", "{:.2f}"),
    ("server RSS per idle connection (KiB)", "kib_per_connection", "{:.1f}"),
]
COUNTER_ROWS = [  # with --counters
    ("connect: full garbage collections", "full collections", "{:.0f}"),
    ("connect: their CPU time (s)", "full collection s", "{:.2f}"),
    *((f"{label}: packets per writer wake-up", f"{phase} packets/wake-up", "{:.2f}")
      for phase, _, _, label in DELIVERY),
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
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():  # py-spy, stopped by SIGINT, can leave a torn line
            continue
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


def gateway_with(settings: list[str]) -> tuple[str, Setup]:
    """The gateway as ./run start runs it, with these NAME=VALUE settings: a column's name and setup."""
    if bad := [s for s in settings if not re.fullmatch(r"GATEWAY_[A-Z0-9_]+=.*|BENCH_GC_THRESHOLD=[0-9,]+", s)]:
        raise SystemExit(f"--gateway-env takes GATEWAY_NAME=VALUE or BENCH_GC_THRESHOLD=N,N,N, got {bad[0]!r}")
    env = NO_DEFLATE | dict(setting.split("=", 1) for setting in settings)
    return f"./run start + {' '.join(settings)}", Setup("gateway", env=env)


def add_columns(table: str, args: argparse.Namespace) -> tuple[dict[str, Setup], list[tuple[str, str]]]:
    """The table's setups and ratios, with the columns --gateway-env, --gateway-tree and --gateway-python add, and
    --counters'."""
    setups, ratios = dict(TABLES[table][0]), list(TABLES[table][1])
    reference = "./run start" if "./run start" in setups else next(iter(setups))
    if settings := args.gateway_env or ([RECOVERY] if table == "recovery" else []):
        name, setups[name] = gateway_with(settings)
        ratios.append((name, reference))
    if args.gateway_tree:
        tree = args.gateway_tree.resolve()
        if not (tree / "gateway.py").is_file():
            raise SystemExit(f"--gateway-tree: no gateway.py in {tree}")
        name = f"gateway at {tree.name}, as ./run start"
        setups[name] = Setup("gateway", env=NO_DEFLATE | {"BENCH_GATEWAY_TREE": str(tree)})
        ratios.append((reference, name))
    if args.gateway_python:
        version = subprocess.run([args.gateway_python, "-c", "import platform; print(platform.python_version())"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        name = f"./run start, Python {version}"
        setups[name] = Setup("gateway", env=NO_DEFLATE, python=args.gateway_python)
        ratios.append((reference, name))
    if args.counters:
        setups = {n: replace(s, env=s.env | {"BENCH_COUNTERS": "1"}) for n, s in setups.items()}
    return setups, ratios


def print_table(medians: dict[str, dict[str, float]], ratios: list[tuple[str, str]], rows: list) -> None:
    """A Markdown table: a column per setup, then one per ratio; a cell is "-" where a setup has no such figure."""
    columns = [*medians, *(f"{a} / {b}" for a, b in ratios)]
    print(f"| figure | {' | '.join(columns)} |")
    print("|---" * (len(columns) + 1) + "|")
    for label, key, form in rows:
        keys = key if isinstance(key, tuple) else (key,)
        cells = [form.format(*(m[k] for k in keys)) if all(k in m for k in keys) else "-" for m in medians.values()]
        cells += [ratio(medians[a][key], medians[b][key]) if isinstance(key, str) and key in medians[a]
                  and key in medians[b] else "" for a, b in ratios]
        print(f"| {label} | {' | '.join(cells)} |")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=TABLES, default="main")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="one round under py-spy, samples into DIR")
    parser.add_argument("--gateway-env", action="append", metavar="GATEWAY_NAME=VALUE",
                        help="add a column: ./run start with these settings (repeatable: one column for all)")
    parser.add_argument("--gateway-tree", type=Path, metavar="DIR",
                        help="add a column: the gateway of another checkout")
    parser.add_argument("--gateway-python", metavar="PATH",
                        help="add a column: the gateway under another venv's interpreter (e.g. .venv-py312/bin/python)")
    parser.add_argument("--counters", action="store_true",
                        help="add rows: full GCs while connecting, packets per python-engineio writer wake-up")
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})  # the servers have core 0
    setups, ratios = add_columns(args.table, args)
    sizes = (40, 20, 5, 100, 20) if args.smoke else (2000, 1000, 200, 20000, 500)
    rounds, (connections, clients, broadcasts, targeted, singles) = 1 if args.smoke else args.rounds, sizes
    redis = start_redis(REDIS_PORT) if any("GATEWAY_REDIS_URL" in setup.env for setup in setups.values()) else None
    try:
        if args.profile:
            await profile(setups, args.profile, sizes)
            return
        results: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
        for _ in range(rounds):
            for name, setup in setups.items():
                results[name].append(await one_round(setup, *sizes, counters=args.counters))
    finally:
        if redis:
            redis.terminate()
    medians = {s: {k: statistics.median(r[k] for r in runs if k in r) for k in runs[0]} for s, runs in results.items()}
    print(f"{connections} connections to a fresh server; then {clients} clients, {broadcasts} broadcasts, "
          f"{targeted} emit_to_user, each burst and spaced ({SPACING} loop turns after each emit), {singles} single "
          f"emits 5 ms apart; medians of {rounds} interleaved rounds; {time.strftime('%Y-%m-%d')}")
    print_table(medians, ratios, ROWS + (COUNTER_ROWS if args.counters else []))
    print(f"| lost messages, failed connections | {' | '.join('0' for _ in setups)} |{' |' * len(ratios)}")


if __name__ == "__main__":
    asyncio.run(main())
