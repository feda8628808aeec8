"""The gateway against bare python-socketio, interleaved in one run: connections, fan-out, targeted, latency, memory.

    .venv/bin/python bench/fanout.py            # 3 rounds (gateway, bare, gateway, bare, ...), medians
    .venv/bin/python bench/fanout.py --smoke    # a few seconds, to prove the script still runs

Each server runs as its own uvicorn process on core 0 (bench/apps.py); the load generator is the official
socket.io-client in one Node process on core 1 (bench/loadgen.mjs), offering permessage-deflate as browsers do
unless DEFLATE=0. Figures: connections/s (100 in flight), delivered msgs/s for fan-out (broadcasts of ~100 bytes)
and targeted (emit_to_user spread over all users), emit-to-receipt latency at light load (one emit every 5 ms),
server RSS per idle connection, server CPU µs per delivered message, and each side's CPU. Nothing may be lost:
the load generator counts every message and a phase that does not complete fails the run.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
import urllib.request

from harness import ROOT, SECRET, cpu_seconds, free_port, rss_bytes, start_load_generator, start_node

from auth import mint_token


def post(url: str, job: dict) -> None:
    request = urllib.request.Request(f"{url}/bench/emit", json.dumps(job).encode(), method="POST")
    urllib.request.urlopen(request, timeout=600).read()


class LoadGenerator:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def line(self) -> dict:
        return json.loads(await asyncio.wait_for(self.process.stdout.readline(), 300))

    async def measure(self, url: str, job: dict, expect: int, server_pid: int) -> dict:
        self.process.stdin.write(json.dumps({"expect": expect}).encode() + b"\n")
        await self.line()  # ready
        cpu_before, own_before = cpu_seconds(server_pid), cpu_seconds(self.process.pid)
        await asyncio.to_thread(post, url, job)
        result = await self.line()
        result["server_cpu"] = cpu_seconds(server_pid) - cpu_before
        result["loadgen_cpu"] = cpu_seconds(self.process.pid) - own_before
        return result


# The servers compared: (app factory, extra environment). The second is the gateway as `./run start` starts it,
# which turns uvicorn's per-message deflate off; the others run under uvicorn's defaults.
SERVERS = {
    "gateway": ("gateway", {}),
    "gateway, ./run start": ("gateway", {"UVICORN_WS_PER_MESSAGE_DEFLATE": "false"}),
    "bare": ("bare", {}),
}


async def one_round(server: str, clients: int, broadcasts: int, targeted: int, singles: int) -> dict[str, float]:
    port = free_port()
    factory, env = SERVERS[server]
    app = f"bench.apps:make_{factory}_app"
    node = start_node(port, {"GATEWAY_JWT_SECRET": SECRET, **env}, app, "--factory", "--log-level", "warning")
    url = f"http://127.0.0.1:{port}"
    users = [f"user{n}" for n in range(clients)]
    auths = [{"token": mint_token(u, SECRET)} if factory == "gateway" else {"user": u} for u in users]
    auth_file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump(auths, auth_file)
    auth_file.close()
    rss_idle = rss_bytes(node.pid)
    process = await asyncio.create_subprocess_exec(
        "taskset", "-c", "1", "node", str(ROOT / "bench" / "loadgen.mjs"), url, auth_file.name,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    loadgen = LoadGenerator(process)
    try:
        connected = await loadgen.line()
        os.unlink(auth_file.name)
        assert connected["connected"] == clients and connected["failed"] == 0, connected
        per_connection = (rss_bytes(node.pid) - rss_idle) / clients
        fan = await loadgen.measure(url, {"kind": "fanout", "count": broadcasts, "users": clients},
                                    clients * broadcasts, node.pid)
        tgt = await loadgen.measure(url, {"kind": "targeted", "count": targeted, "users": clients},
                                    targeted, node.pid)
        lat = await loadgen.measure(url, {"kind": "latency", "count": singles, "users": clients},
                                    singles, node.pid)
        return {
            "connections_per_s": clients / connected["seconds"],
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
    finally:
        process.stdin.write(b'{"close": true}\n')
        await asyncio.wait_for(process.wait(), 60)
        node.terminate()
        node.wait(30)


ROWS = [
    ("connections/s (100 in flight)", "connections_per_s", "{:,.0f}"),
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


async def main() -> None:
    smoke = start_load_generator(__doc__)
    rounds, clients, broadcasts, targeted, singles = (1, 20, 5, 100, 20) if smoke else (3, 1000, 200, 20000, 500)
    results: dict[str, list[dict[str, float]]] = {server: [] for server in SERVERS}
    for _ in range(rounds):
        for server in results:
            results[server].append(await one_round(server, clients, broadcasts, targeted, singles))
    medians = {s: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for s, runs in results.items()}
    print(f"{clients} clients, {broadcasts} broadcasts, {targeted} emit_to_user, {singles} single emits 5 ms apart; "
          f"medians of {rounds} interleaved rounds; {time.strftime('%Y-%m-%d')}")
    print("| figure | gateway | gateway, ./run start | bare python-socketio | gateway / bare | ./run start / bare |")
    print("|---|---|---|---|---|---|")
    for label, key, form in ROWS:
        keys = key if isinstance(key, tuple) else (key,)
        cells = [form.format(*(medians[s][k] for k in keys)) for s in SERVERS]
        ratios = [medians[s][keys[0]] / medians["bare"][keys[0]] for s in ("gateway", "gateway, ./run start")]
        print(f"| {label} | {' | '.join(cells)} | {ratios[0]:.2f} | {ratios[1]:.2f} |")
    print("| lost messages, failed connections | 0 | 0 | 0 | | |")


if __name__ == "__main__":
    asyncio.run(main())
