"""Operating the gateway: Prometheus metrics, logs (text and JSON), and the nginx recipe in deploy/."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request

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

from asgi import create_app
from gateway import END_EVENT

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
            assert value(await scrape(url), "gateway_redis_up") == 1
    changes = [r.getMessage() for r in caplog.records if r.name == "gateway" and "redis" in r.getMessage()]
    assert changes[0] == "redis reachable" and changes[2] == "redis reachable"
    assert changes[1].startswith("redis unreachable")


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
    from gateway import load_settings

    for name, bad in (("LOG_LEVEL", "LOUD"), ("LOG_FORMAT", "xml"), ("METRICS", "maybe")):
        with pytest.raises(ValueError, match=f"GATEWAY_{name}"):
            load_settings({"GATEWAY_JWT_SECRET": SECRET, f"GATEWAY_{name}": bad})


# ---- the deployment recipe: Debian's nginx in front of two gateway processes ---------------------------


def nginx_config(template: str, listen: int, upstreams: list[int], workdir: str) -> str:
    """deploy/nginx.conf with this machine's ports and a private working directory, ready for `nginx -c`."""
    servers = "\n".join(f"    server 127.0.0.1:{port};" for port in upstreams)
    site = template.replace("    server 127.0.0.1:8001;\n    server 127.0.0.1:8002;", servers)
    site = site.replace("listen 80;", f"listen 127.0.0.1:{listen};")
    return f"""
pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
{site}
}}
"""


def test_nginx_recipe_proxies_websocket_and_polling_and_forwards_the_client_address(tmp_path):
    nginx = require_program("nginx")
    with redis_server() as redis_srv:
        env = {"GATEWAY_REDIS_URL": redis_srv.url, "GATEWAY_PUBLISH_KEY": KEY}
        proxy_args = ("--proxy-headers", "--forwarded-allow-ips", "127.0.0.1")
        with gateway_process(*proxy_args, env=env) as (url_a, node_a):
            with gateway_process(*proxy_args, env=env) as (url_b, node_b):
                ports = [int(url.rsplit(":", 1)[1]) for url in (url_a, url_b)]
                listen = free_port()
                config = tmp_path / "nginx.conf"
                template = (ROOT / "deploy" / "nginx.conf").read_text()
                config.write_text(nginx_config(template, listen, ports, str(tmp_path)))
                server = subprocess.Popen([nginx, "-c", str(config), "-g", "daemon off;"])
                try:
                    front = f"http://127.0.0.1:{listen}"
                    wait_for_port(listen)
                    assert get(f"{front}/health")[0] == 200
                    assert get(f"{front}/metrics")[0] == 404
                    asyncio.run(through_nginx(front))
                finally:
                    server.terminate()
                    server.wait(TIMEOUT)
                logs = []
                for node in (node_a, node_b):
                    node.send_signal(signal.SIGTERM)
                    node.wait(TIMEOUT)
                    logs += node.stderr.read().splitlines()
    refusals = [line for line in logs if "refused connection" in line]
    # The client connected from 127.0.0.2; nginx itself talks to the gateway from 127.0.0.1.
    assert len(refusals) == 4 and all("refused connection from 127.0.0.2:" in line for line in refusals)


async def through_nginx(front: str) -> None:
    for transports in (["websocket"], ["polling", "websocket"]):
        async with connected(front, "alice", "bob", transports=transports) as [alice, _]:
            async with aiohttp.ClientSession() as http:
                headers = {"Authorization": f"Bearer {KEY}"}
                message = {"user_id": "alice", "event": "via-nginx", "data": transports}
                async with http.post(f"{front}/publish", json=message, headers=headers) as response:
                    assert response.status == 200
            assert await alice.next_event() == ("via-nginx", transports)
    # Refused connections from another loopback address, once per node behind nginx.
    for _ in range(4):
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=connector) as session:
            client = socketio.AsyncClient(reconnection=False, http_session=session)
            with pytest.raises(socketio.exceptions.ConnectionError):
                await client.connect(front, auth={"token": "x.y.z"}, transports=["websocket"], wait_timeout=TIMEOUT)


def test_systemd_unit_names_the_start_command():
    unit = (ROOT / "deploy" / "socket-gateway.service").read_text()
    assert "ExecStart=" in unit and "uvicorn asgi:app" in unit and "--workers" in unit
    assert "--proxy-headers" in unit and "PROMETHEUS_MULTIPROC_DIR" in unit
    assert "--ws-per-message-deflate false" in unit and "--ws-max-size 16384" in unit  # as ./run start sets them
