"""Operating the gateway: Prometheus metrics, logs (text and JSON), and the nginx and systemd recipe in deploy/."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import socketio
from conftest import (
    ROOT,
    SECRET,
    TIMEOUT,
    Client,
    connected,
    eventually,
    free_port,
    gateway_process,
    make_gateway,
    redis_server,
    refusal,
    require_program,
    serve,
    token,
    wait_for_port,
)
from prometheus_client.parser import text_string_to_metric_families
from test_cluster import wait_for_subscribers

from asgi import create_app
from gateway import END_EVENT, Emitter, redis_publisher

pytestmark = pytest.mark.anyio

KEY = "publish-key-" + "k" * 40


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample /metrics serves, keyed by (name, sorted labels)."""
    status, text = await asyncio.to_thread(get, f"{url}/metrics")
    assert status == 200, text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_route_does_not_exist_unless_enabled():
    async with serve(create_app(make_gateway())) as url:
        assert (await asyncio.to_thread(get, f"{url}/metrics"))[0] == 404


async def test_metrics_move_as_connections_come_go_and_messages_flow():
    gateway = make_gateway(METRICS="1", PUBLISH_KEY=KEY, MAX_CONNECTIONS_PER_USER="2", JWT_LEEWAY="0")
    async with serve(create_app(gateway)) as url:
        async with connected(url, "alice", "alice", "bob") as [_, _, bob]:
            m = await scrape(url)
            assert value(m, "gateway_connections") == 3
            assert value(m, "gateway_connected_users") == 2
            assert value(m, "gateway_connections_accepted_total") == 3

            await refusal(url, {"token": "x.y.z"})
            await refusal(url, {"token": token("carol", ttl=-60)})
            await refusal(url, None)
            await refusal(url, {"token": token("alice")})  # a third tab: over the limit of 2
            m = await scrape(url)
            for reason in ("invalid", "expired", "missing", "limit"):
                assert value(m, "gateway_connections_refused_total", reason=reason) == 1, reason
            assert value(m, "gateway_connections") == 3

            await gateway.join_room(bob.sid, "r")
            await gateway.emit_to_user("alice", "e", 1)
            await gateway.emit_to_room("r", "e", 2)
            await gateway.broadcast("e", 3)
            await gateway.broadcast("e", 4)
            async with aiohttp.ClientSession() as http:
                headers = {"Authorization": f"Bearer {KEY}"}
                async with http.post(f"{url}/publish", json={"user_id": "bob", "event": "e"}, headers=headers) as r:
                    assert r.status == 200
            m = await scrape(url)
            assert value(m, "gateway_emits_total", kind="user") == 2  # one in-process, one through the API
            assert value(m, "gateway_emits_total", kind="room") == 1
            assert value(m, "gateway_emits_total", kind="broadcast") == 2
            assert value(m, "gateway_publish_api_messages_total", kind="user") == 1

            await bob.close()
            await eventually(lambda: gateway.connection_count("bob") == 0)
            assert await gateway.disconnect_user("alice") == 2
            await eventually(lambda: gateway.connection_count("alice") == 0)
            short = Client()
            await short.connect(url, auth={"token": token("dora", ttl=1)})
            assert await short.next_event() == (END_EVENT, {"reason": "token_expired"})
            await short.wait_disconnected()
            await eventually(lambda: gateway.connection_count("dora") == 0)
            m = await scrape(url)
            assert value(m, "gateway_disconnects_total", reason="logout") == 2
            assert value(m, "gateway_disconnects_total", reason="token_expired") == 1
            # bob left by himself: python-socketio names that "client disconnect" or, when the socket closed
            # first, "transport close"
            left = ("client_disconnect", "transport_close")
            assert sum(value(m, "gateway_disconnects_total", reason=reason) for reason in left) == 1
            assert value(m, "gateway_connections") == 0
            assert value(m, "gateway_connected_users") == 0


async def test_redis_up_gauge_follows_redis(caplog):
    with redis_server() as redis_srv:
        gateway = make_gateway(METRICS="1", REDIS_URL=redis_srv.url)
        async with serve(create_app(gateway)) as url:
            assert value(await scrape(url), "gateway_redis_up") == 1
            redis_srv.kill()
            assert value(await scrape(url), "gateway_redis_up") == 0
            redis_srv.start()
            await wait_for_subscribers(redis_srv.url, 1)  # python-socketio's listener resubscribes by itself
            assert value(await scrape(url), "gateway_redis_up") == 1
    changes = [r.getMessage() for r in caplog.records if r.name == "gateway" and "redis" in r.getMessage()]
    assert changes[0] == "redis reachable" and changes[-1] == "redis reachable"  # one line per change of state
    assert changes[1].startswith("redis unreachable: ConnectionError") and len(changes) <= 4


OTHER_WORKER = """
from gateway import GatewayMetrics
metrics = GatewayMetrics()
metrics.connections.inc(5)
metrics.accepted.inc(5)
"""


def test_metrics_of_all_workers_are_summed(tmp_path):
    with redis_server() as redis_srv:
        env = {
            "GATEWAY_REDIS_URL": redis_srv.url,
            "GATEWAY_METRICS": "1",
            "GATEWAY_TRANSPORTS": "websocket",
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        }
        with gateway_process("--workers", "2", env=env) as (url, _):
            # The kernel may hand every connection to one worker, so a third process stands in for "another
            # worker" with values of its own, written to the same directory the way a worker writes them.
            other_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
            other_env |= {"GATEWAY_JWT_SECRET": SECRET, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
            subprocess.run([sys.executable, "-c", OTHER_WORKER], cwd=ROOT, env=other_env, check=True, timeout=30)

            async def scenario() -> None:
                async with connected(url, *[f"user{n}" for n in range(8)]):
                    for _ in range(4):  # whichever worker answers, it reports every process's values
                        samples = await scrape(url)
                        assert value(samples, "gateway_connections") == 8 + 5
                        assert value(samples, "gateway_connections_accepted_total") == 8 + 5

            asyncio.run(scenario())


def run_gateway_and_refuse(env: dict[str, str]) -> list[str]:
    """Start a gateway process with `env`, make one connection it refuses, stop it, and return its stderr lines."""
    with gateway_process(env=env) as (url, process):

        async def refuse() -> None:
            await refusal(url, {"token": token("mallory", secret="forged-secret-" + "f" * 40)})

        asyncio.run(refuse())
        process.send_signal(signal.SIGTERM)
        process.wait(TIMEOUT)
        return process.stderr.read().splitlines()


def test_json_logs_are_json_and_carry_reason_and_client():
    lines = run_gateway_and_refuse({"GATEWAY_LOG_FORMAT": "json"})
    ours = [json.loads(line) for line in lines if line.startswith("{")]
    refusals = [entry for entry in ours if entry["message"].startswith("refused connection")]
    assert len(refusals) == 1
    entry = refusals[0]
    assert entry["level"] == "INFO" and entry["logger"] == "gateway" and entry["reason"] == "invalid"
    assert entry["client"].startswith("127.0.0.1:")
    assert {"time", "level", "logger", "message"} <= set(entry)


def test_text_logs_have_one_line_per_refusal_and_nothing_per_message():
    lines = run_gateway_and_refuse({})
    assert len([line for line in lines if "refused connection from 127.0.0.1:" in line]) == 1
    assert not [line for line in lines if "emitting event" in line or "received event" in line]


def test_bad_log_settings_are_refused_at_start_up():
    from gateway import Settings

    for name, bad in (("LOG_LEVEL", "LOUD"), ("LOG_FORMAT", "xml"), ("METRICS", "maybe")):
        with pytest.raises(ValueError, match=f"GATEWAY_{name}"):
            Settings({"GATEWAY_JWT_SECRET": SECRET, f"GATEWAY_{name}": bad})


# ---- the deployment recipe: deploy/nginx.conf in front of deploy/socket-gateway@.service instances ------------

UNIT = ROOT / "deploy" / "socket-gateway@.service"
SITE = ROOT / "deploy" / "nginx.conf"
INSTALLED_UVICORN = "/opt/socket-gateway/.venv/bin/uvicorn"
# nginx's ip_hash keys an IPv4 client on its first three octets: every 127.0.0.x is one client to it. Loopback
# answers on all of 127/8, so each client here connects from an address of its own /24.
POLLING_ADDRESSES = [f"127.0.{n}.1" for n in range(1, 21)]
WEBSOCKET_ADDRESSES = [f"127.0.{n}.1" for n in range(21, 25)]
UPGRADING_ADDRESSES = [f"127.0.{n}.1" for n in range(25, 29)]
REFUSED_ADDRESSES = [f"127.0.{n}.1" for n in range(29, 33)]
ACCESS_LOG_FORMAT = "$remote_addr|$status|$request_method|$uri|$arg_sid|$upstream_addr"


def unit_command(unit: str, instance: str) -> list[str]:
    """The unit's ExecStart with `instance` as its %i, run by this test's Python instead of the installed venv."""
    [line] = [line for line in unit.replace("\\\n", " ").splitlines() if line.startswith("ExecStart=")]
    program, *args = shlex.split(line.removeprefix("ExecStart="))
    assert program == INSTALLED_UVICORN, program
    return [sys.executable, "-m", "uvicorn", *(arg.replace("%i", instance) for arg in args)]


def upstream_ports(site: str) -> list[int]:
    return [int(port) for port in re.findall(r"^\s*server 127\.0\.0\.1:(\d+);", site, re.MULTILINE)]


def site_on_ports(site: str, listen: int, ports: dict[int, int]) -> str:
    """`site` listening on 127.0.0.1:`listen`, each shipped upstream port moved to its free port in `ports`."""
    site, listens = re.subn(r"^(\s*)listen 80;", rf"\1listen 127.0.0.1:{listen};", site, flags=re.MULTILINE)
    assert listens == 1, "deploy/nginx.conf should have one `listen 80;`"
    for shipped, port in ports.items():
        site, moved = re.subn(rf"server 127\.0\.0\.1:{shipped};", f"server 127.0.0.1:{port};", site)
        assert moved == 1, shipped
    return site


def nginx_config(site: Path, workdir: Path) -> str:
    """A private nginx (pid, logs, temporary files in `workdir`) whose http block includes `site`."""
    return f"""
pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
events {{ worker_connections 256; }}
http {{
    log_format gateway '{ACCESS_LOG_FORMAT}';
    access_log {workdir}/access.log gateway;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    include {site};
}}
"""


@contextlib.contextmanager
def running(
    commands: dict[int, list[str]], logs: Path, env: dict[str, str] | None = None, stop_timeout: float = TIMEOUT
) -> Iterator[None]:
    """Run each command until it accepts on its port (stderr into logs/<port>.log); SIGTERM all of them at once on
    the way out, and wait `stop_timeout` for them, as systemd stops a unit's instances."""
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for port, command in commands.items():
            with (logs / f"{port}.log").open("wb") as stderr:
                processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stderr=stderr))
        for port, process in zip(commands, processes):
            wait_for_port(port, process)
        yield
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(stop_timeout)
            finally:
                process.kill()  # nothing to do for one that exited


def gateway_env(**settings: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return environ | {"GATEWAY_JWT_SECRET": SECRET} | {f"GATEWAY_{k}": v for k, v in settings.items()}


def test_shipped_nginx_and_systemd_recipe_keeps_every_client_on_one_process(tmp_path):
    """deploy/nginx.conf in front of one deploy/socket-gateway@.service instance per upstream it lists."""
    nginx = require_program("nginx")
    unit, shipped_site = UNIT.read_text(), SITE.read_text()
    ports = {shipped: free_port() for shipped in upstream_ports(shipped_site)}
    assert len(ports) >= 2, "the recipe should spread clients over several processes"
    listen = free_port()
    site = tmp_path / "site.conf"
    site.write_text(site_on_ports(shipped_site, listen, ports))
    gateway_logs, nginx_logs = tmp_path / "gateways", tmp_path / "nginx"
    gateway_logs.mkdir()
    nginx_logs.mkdir()
    (tmp_path / "nginx.conf").write_text(nginx_config(site, nginx_logs))
    stop_timeout = float(re.findall(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE)[0])
    with redis_server() as redis_srv:
        env = gateway_env(REDIS_URL=redis_srv.url, PUBLISH_KEY=KEY, METRICS="1")
        instances = {port: unit_command(unit, str(port)) for port in ports.values()}
        with running(instances, gateway_logs, env, stop_timeout):
            with running({listen: [nginx, "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"]}, nginx_logs):
                front = f"http://127.0.0.1:{listen}"
                assert get(f"{front}/health")[0] == 200
                assert get(f"{front}/metrics")[0] == 404
                instance_urls = [f"http://127.0.0.1:{port}" for port in ports.values()]
                access_log = nginx_logs / "access.log"
                asyncio.run(through_nginx(front, instance_urls, redis_publisher(redis_srv.url), access_log))
    logs = "".join(log.read_text() for log in gateway_logs.iterdir())
    assert "Invalid session" not in logs
    # nginx reaches the gateways from 127.0.0.1; the refusals are logged with each client's own address.
    refusals = [line for line in logs.splitlines() if "refused connection" in line]
    assert sorted(line.split("refused connection from ")[1].split(":")[0] for line in refusals) == REFUSED_ADDRESSES
    requests = [line.split("|") for line in (nginx_logs / "access.log").read_text().splitlines()]
    socketio_requests = [request for request in requests if request[3] == "/socket.io/"]
    upstreams_of: dict[str, set[str]] = {}  # client address or Engine.IO session -> the upstreams that served it
    for client, _, _, _, sid, upstream in socketio_requests:
        upstreams_of.setdefault(client, set()).add(upstream)
        if sid != "-":
            upstreams_of.setdefault(sid, set()).add(upstream)
    assert all(len(upstreams) == 1 for upstreams in upstreams_of.values()), upstreams_of  # one process each
    used = {upstream for address in POLLING_ADDRESSES for upstream in upstreams_of[address]}
    assert used == {f"127.0.0.1:{port}" for port in ports.values()}  # and polling clients on every process


def session_from(address: str) -> aiohttp.ClientSession:
    """An HTTP session whose connections leave from the local `address`."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))


@contextlib.asynccontextmanager
async def connected_from(address: str, url: str, user_id: str, transports: list[str]) -> AsyncIterator[Client]:
    """A client connected to `url` from the local `address` as `user_id`."""
    async with session_from(address) as session:
        client = Client(http_session=session)
        try:
            await client.connect(url, auth={"token": token(user_id)}, transports=transports)
            yield client
        finally:
            await client.close()


async def through_nginx(front: str, instances: list[str], publisher: Emitter, access_log: Path) -> None:
    kinds = {
        "polling": (POLLING_ADDRESSES, ["polling"]),
        "websocket": (WEBSOCKET_ADDRESSES, ["websocket"]),
        "upgrading": (UPGRADING_ADDRESSES, ["polling", "websocket"]),
    }
    async with contextlib.AsyncExitStack() as stack:
        clients: dict[str, Client] = {}
        for kind, (addresses, transports) in kinds.items():
            for n, address in enumerate(addresses):
                user = f"{kind}{n}"
                clients[user] = await stack.enter_async_context(connected_from(address, front, user, transports))
        for n in range(len(UPGRADING_ADDRESSES)):
            await eventually(lambda client=clients[f"upgrading{n}"]: client.sio.transport() == "websocket")
        # Each instance reports only its own connections, scraped on its own port; every one has some.
        counts = [value(await scrape(url), "gateway_connections") for url in instances]
        assert sum(counts) == len(clients) and all(counts), counts
        headers = {"Authorization": f"Bearer {KEY}"}
        async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(TIMEOUT)) as http:
            for round_ in range(3):  # each round is a new long-poll answer for every polling client
                batch = [{"user_id": user, "event": "via-nginx", "data": round_} for user in clients]
                async with http.post(f"{front}/publish", json=batch) as response:
                    assert response.status == 200, await response.text()
                for user, client in clients.items():
                    assert await client.next_event() == ("via-nginx", round_), user
        # Every request so far was answered by the process holding its session. (After the logouts below, a
        # poll of a session the server closed is answered 400, as it should be.)
        assert [line for line in access_log.read_text().splitlines() if line.split("|")[1] == "400"] == []
        # Ended by the server: a polling client closing itself waits until its pending long-poll ends at the
        # next ping (25 s).
        for user, client in clients.items():
            await publisher.disconnect_user(user)
            assert await client.next_event() == (END_EVENT, {"reason": "logout"}), user
            await client.wait_disconnected()
    for address in REFUSED_ADDRESSES:
        async with session_from(address) as session:
            client = socketio.AsyncClient(reconnection=False, http_session=session)
            with pytest.raises(socketio.exceptions.ConnectionError):
                await client.connect(front, auth={"token": "x.y.z"}, transports=["websocket"], wait_timeout=TIMEOUT)


def test_systemd_unit_runs_one_process_per_port_with_the_documented_flags():
    unit = UNIT.read_text()
    command = unit_command(unit, "8001")
    assert "--workers" not in command and command[command.index("--port") + 1] == "8001"
    for flags in (
        "--proxy-headers --forwarded-allow-ips 127.0.0.1",  # the client's address reaches the logs, not nginx's
        "--timeout-graceful-shutdown 10 --no-access-log",
        "--ws-per-message-deflate false --ws-max-size 16384",  # as ./run start sets them
    ):
        assert flags in " ".join(command), flags
    assert "UnsetEnvironment=PROMETHEUS_MULTIPROC_DIR" in unit  # each instance reports its own metrics
    assert "GATEWAY_REDIS_URL is required" in unit
    assert {"DynamicUser=yes", "NoNewPrivileges=yes", "ProtectSystem=strict"} <= set(unit.splitlines())


def test_nginx_timeouts_fit_the_gateways_ping():
    from gateway import Settings

    settings = Settings({"GATEWAY_JWT_SECRET": SECRET})
    site = SITE.read_text()

    def seconds(directive: str) -> int:
        [found] = re.findall(rf"^\s*{directive} (\d+)s;", site, re.MULTILINE)
        return int(found)

    silent_client_ended = settings.ping_interval + settings.ping_timeout
    assert seconds("proxy_read_timeout") > silent_client_ended  # a quiet, healthy connection is never cut
    # nginx frees a client that reads nothing, or a process that takes nothing, before the ping would
    for directive in ("send_timeout", "proxy_send_timeout"):
        assert seconds(directive) < silent_client_ended, directive
