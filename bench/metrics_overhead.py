"""What counting costs: server CPU per delivered message with GATEWAY_METRICS=1 against GATEWAY_METRICS=0.

    .venv/bin/python bench/metrics_overhead.py            # 3 interleaved rounds (off, on, off, on, ...), medians
    .venv/bin/python bench/metrics_overhead.py --smoke    # a few seconds, to prove the script still runs

The gateway runs as its own uvicorn process on core 0; python-socketio clients (the load generator) on core 1.
Messages enter through POST /publish in batches, so the emits happen inside the server: broadcasts to every
client (fan-out) and emit_to_user spread over all users (targeted). Loops are bounded and stop by themselves.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import urllib.request

from harness import connect_clients, cpu_seconds, free_port, start_load_generator, start_node, wait_for

KEY = "bench-publish-key-" + "p" * 32


def publish(url: str, messages: list[dict]) -> None:
    body = json.dumps(messages).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    urllib.request.urlopen(urllib.request.Request(f"{url}/publish", body, headers), timeout=60).read()


async def one_round(metrics: str, clients: int, broadcasts: int, targeted: int) -> dict[str, float]:
    port = free_port()
    node = start_node(port, {"GATEWAY_METRICS": metrics, "GATEWAY_PUBLISH_KEY": KEY})
    url = f"http://127.0.0.1:{port}"
    inbox: dict[str, list[float]] = {}
    try:
        connected = await connect_clients([url], clients, inbox)
        figures = {}
        fanout = [{"broadcast": True, "event": "msg", "data": {"sent": 0, "text": "x" * 60}}] * broadcasts
        spread = [{"user_id": f"user{n % clients}", "event": "msg", "data": {"sent": 0}} for n in range(targeted)]
        for kind, messages in (("fanout", fanout), ("targeted", spread)):
            for received in inbox.values():
                received.clear()
            expected = clients * broadcasts if kind == "fanout" else targeted
            cpu_before, started = cpu_seconds(node.pid), time.perf_counter()
            for start in range(0, len(messages), 1000):
                await asyncio.to_thread(publish, url, messages[start : start + 1000])
            await wait_for(lambda expected=expected: sum(map(len, inbox.values())) == expected, kind)
            elapsed, cpu = time.perf_counter() - started, cpu_seconds(node.pid) - cpu_before
            figures[f"{kind}_msgs_per_s"] = expected / elapsed
            figures[f"{kind}_server_us_per_msg"] = 1e6 * cpu / expected
        for client in connected:
            await client.disconnect()
        return figures
    finally:
        node.terminate()
        node.wait(30)


async def main() -> None:
    smoke = start_load_generator(__doc__)
    # About half a second of server CPU per phase: the kernel counts CPU time in 10 ms ticks.
    rounds, clients, broadcasts, targeted = (1, 10, 10, 100) if smoke else (3, 200, 500, 20000)
    results: dict[str, list[dict[str, float]]] = {"0": [], "1": []}
    for _ in range(rounds):
        for metrics in ("0", "1"):
            results[metrics].append(await one_round(metrics, clients, broadcasts, targeted))
    print(f"{clients} clients; fan-out: {broadcasts} broadcasts; targeted: {targeted} emit_to_user; "
          f"medians of {rounds} interleaved rounds; {time.strftime('%Y-%m-%d')}")
    print("| GATEWAY_METRICS | fan-out msgs/s | server µs per fan-out msg | targeted msgs/s "
          "| server µs per targeted msg |")
    print("|---|---|---|---|---|")
    for metrics, runs in results.items():
        m = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(f"| {metrics} | {m['fanout_msgs_per_s']:,.0f} | {m['fanout_server_us_per_msg']:.1f} | "
              f"{m['targeted_msgs_per_s']:,.0f} | {m['targeted_server_us_per_msg']:.1f} |")


if __name__ == "__main__":
    asyncio.run(main())
