"""One node against two nodes sharing a Redis: delivered messages per second and emit-to-receipt latency.

    .venv/bin/python bench/cluster.py            # 3 interleaved rounds, medians printed as a Markdown table
    .venv/bin/python bench/cluster.py --smoke    # a few seconds, to prove the script still runs

Everything runs on 127.0.0.1: a redis-server, the gateway nodes as uvicorn processes (pinned to core 0), and the
load generator (python-socketio clients and a `redis_publisher`) in this process with Redis on core 1. Every loop
is bounded in count and time and stops by itself.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time

from harness import connect_clients, cpu_seconds, free_port, start_load_generator, start_node, start_redis, wait_for

from gateway import redis_publisher


async def one_round(nodes: int, clients: int, broadcasts: int, single_emits: int, redis_url: str) -> dict[str, float]:
    ports = [free_port() for _ in range(nodes)]
    processes = [start_node(port, {"GATEWAY_REDIS_URL": redis_url}) for port in ports]
    inbox: dict[str, list[float]] = {}
    publisher = redis_publisher(redis_url)
    try:
        connected = await connect_clients([f"http://127.0.0.1:{p}" for p in ports], clients, inbox)
        cpu_before = sum(cpu_seconds(p.pid) for p in processes)
        own_cpu_before = time.process_time()
        started = time.perf_counter()
        for _ in range(broadcasts):
            await publisher.broadcast("msg", {"sent": time.perf_counter(), "text": "x" * 60})
        await wait_for(lambda: all(len(r) == broadcasts for r in inbox.values()), "broadcasts")
        elapsed = time.perf_counter() - started
        node_cpu = sum(cpu_seconds(p.pid) for p in processes) - cpu_before
        loadgen_cpu = time.process_time() - own_cpu_before
        for received in inbox.values():
            received.clear()
        users = [f"user{random.randrange(clients)}" for _ in range(single_emits)]
        for user in users:
            await publisher.emit_to_user(user, "msg", {"sent": time.perf_counter()})
            await asyncio.sleep(0.005)
        await wait_for(lambda: sum(map(len, inbox.values())) == single_emits, "single emits")
        latencies = sorted(latency for received in inbox.values() for latency in received)
        for client in connected:
            await client.disconnect()
        delivered = clients * broadcasts
        return {
            "msgs_per_s": delivered / elapsed,
            "node_cpu_share": node_cpu / elapsed,
            "loadgen_cpu_share": loadgen_cpu / elapsed,
            "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            "lost": 0,  # wait_for above fails the run on any missing message
        }
    finally:
        for process in processes:
            process.terminate()
            process.wait(30)


async def main() -> None:
    smoke = start_load_generator(__doc__)
    rounds, clients, broadcasts, singles = (1, 10, 5, 10) if smoke else (3, 200, 100, 500)
    redis_port = free_port()
    redis_process = start_redis(redis_port)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    results: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    try:
        for _ in range(rounds):
            for nodes in (1, 2):  # interleaved: 1, 2, 1, 2, ...
                results[nodes].append(await one_round(nodes, clients, broadcasts, singles, redis_url))
    finally:
        redis_process.terminate()
        redis_process.wait(30)
    print(f"{clients} clients, {broadcasts} broadcasts of ~100 bytes, {singles} emit_to_user 5 ms apart; "
          f"medians of {rounds} interleaved rounds")
    print("| nodes | delivered msgs/s | node CPU (cores busy) | load generator CPU | p50 latency | p99 latency | lost |")
    print("|---|---|---|---|---|---|---|")
    for nodes, runs in results.items():
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(f"| {nodes} | {median['msgs_per_s']:,.0f} | {median['node_cpu_share']:.2f} | "
              f"{median['loadgen_cpu_share']:.2f} | "
              f"{median['p50_ms']:.1f} ms | {median['p99_ms']:.1f} ms | {int(median['lost'])} |")


if __name__ == "__main__":
    asyncio.run(main())
