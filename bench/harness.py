"""What the benchmark scripts share: start Redis and gateway nodes pinned to a core, connect clients, read CPU time."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GATEWAY_JWT_SECRET", "bench-secret-" + "b" * 40)

import socketio  # noqa: E402

from auth import mint_token  # noqa: E402

SECRET = os.environ["GATEWAY_JWT_SECRET"]
DEADLINE = 120  # seconds any one phase may take


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants (granian, for one, runs its worker as a child process)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(p for child in children for p in process_tree(int(child)))]


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its descendants."""
    total = 0
    for member in process_tree(pid):
        lines = Path(f"/proc/{member}/status").read_text().splitlines()
        total += next(int(line.split()[1]) * 1024 for line in lines if line.startswith("VmRSS:"))
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process and its descendants have used so far."""
    total = 0
    for member in process_tree(pid):
        fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def start_redis(port: int) -> subprocess.Popen[str]:
    """redis-server on core 1 (beside the load generator), returned once it accepts connections."""
    command = ["taskset", "-c", "1", shutil.which("redis-server") or "redis-server", "--port", str(port)]
    process = subprocess.Popen([*command, "--save", "", "--appendonly", "no"], stdout=subprocess.PIPE, text=True)
    for line in process.stdout:
        if "Ready to accept connections" in line:
            return process
    raise RuntimeError("redis-server did not start")


def start_node(port: int, settings: dict[str, str], app: str = "asgi:app", *args: str) -> subprocess.Popen[str]:
    """`uvicorn <app>` on core 0 with these GATEWAY_* settings, returned once its port accepts."""
    command = [sys.executable, "-m", "uvicorn", app, *args, "--port", str(port), "--log-level", "warning"]
    return start_server(command, port, settings)


def start_server(command: list[str], port: int, settings: dict[str, str], cores: str = "0") -> subprocess.Popen[str]:
    """Any server `command` on `cores` (WebSocket only unless `settings` say otherwise), once `port` accepts."""
    env = os.environ | {"GATEWAY_TRANSPORTS": "websocket"} | settings
    process = subprocess.Popen(["taskset", "-c", cores, *command], cwd=ROOT, env=env)
    wait_for_port(port, process, timeout=30)
    return process


def wait_for_port(port: int, process: subprocess.Popen[str] | None = None, timeout: float = 10) -> None:
    """Wait until a server started in the background accepts on `port`; fail after `timeout` or if `process` exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if (process and process.poll() is not None) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)  # a port that is not open yet sends no event to wait on


async def connect_clients(urls: list[str], count: int, inbox: dict[str, list[float]]) -> list[socketio.AsyncClient]:
    """`count` python-socketio clients, user{n} each, spread over `urls`; each "msg" appends its latency to inbox."""
    clients = []
    for n in range(count):
        user = f"user{n}"
        client = socketio.AsyncClient(reconnection=False)
        received = inbox.setdefault(user, [])

        async def on_message(data, received=received):
            received.append(time.perf_counter() - data["sent"])

        client.on("msg", on_message)
        await client.connect(urls[n % len(urls)], auth={"token": mint_token(user, SECRET)}, transports=["websocket"])
        clients.append(client)
    return clients


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Wait until `condition()` holds; a benchmark phase that takes longer than DEADLINE fails the run."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.005)


def start_load_generator(doc: str) -> bool:
    """Read the command line (only --smoke); pin this process, the load generator, to core 1. True for --smoke."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round")
    smoke = parser.parse_args().smoke
    os.sched_setaffinity(0, {1})  # the gateway nodes have core 0
    return smoke
