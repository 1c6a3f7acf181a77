"""The router's HTTP side, on the metrics port: Prometheus metrics, health, instance admin.

  GET    /metrics                       Prometheus text format
  GET    /health                        200 while some instance is healthy, else 503 (JSON)
  GET    /v1/instances                  every instance and its state (JSON)
  POST   /v1/instances                  {"address": "host:port", "metrics": "host:port"}
  POST   /v1/instances/drain            {"address": "host:port"}: no new requests; dropped
                                        once its in-flight requests finish
  DELETE /v1/instances?address=H:P      the same as drain (graceful removal)

The admin calls change the fleet: expose this port only where operators reach it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.config import ConfigError

if TYPE_CHECKING:
    from router.server import Router

log = logging.getLogger("router.admin")


class AdminServer:
    def __init__(self, router: Router, loop: asyncio.AbstractEventLoop, host: str,
                 port: int) -> None:
        self.router = router
        self.loop = loop
        handler = type("Handler", (_Handler,), {"admin": self})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="router-admin",
                                       daemon=True)

    def start(self) -> AdminServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def on_loop(self, fn, *args):
        """Run `fn` on the router's event loop (the pool is not thread-safe)."""

        async def call():
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout=10)

    def health(self) -> tuple[int, dict]:
        instances = self.on_loop(lambda: [i.describe() for i in
                                          self.router.pool.instances.values()])
        healthy = [i for i in instances if i["healthy"] and not i["draining"]]
        status = ("healthy" if instances and len(healthy) == len(instances)
                  else "degraded" if healthy else "unhealthy")
        body = {"status": status, "healthy_instances": len(healthy),
                "instances": len(instances),
                "queued": self.on_loop(lambda: self.router.admission.queued)}
        return (200 if healthy else 503), body


class _Handler(BaseHTTPRequestHandler):
    admin: AdminServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base's name
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:  # noqa: N802 - the base class's naming
        path = urlsplit(self.path).path
        if path == "/metrics":
            self._send(200, generate_latest(self.admin.router.metrics.registry),
                       CONTENT_TYPE_LATEST)
        elif path in ("/health", "/healthz"):
            status, body = self.admin.health()
            self._json(status, body)
        elif path == "/v1/instances":
            pool = self.admin.router.pool
            self._json(200, self.admin.on_loop(
                lambda: [i.describe() for i in pool.instances.values()]))
        else:
            self._json(404, {"error": f"no such endpoint: GET {path}"})

    def do_POST(self) -> None:  # noqa: N802
        path = urlsplit(self.path).path
        body = self._body()
        if body is None:
            return
        pool = self.admin.router.pool
        address = body.get("address")
        if not isinstance(address, str):
            self._json(400, {"error": 'expected a JSON body with "address": "host:port"'})
            return
        try:
            if path == "/v1/instances":
                instance = self.admin.on_loop(pool.add, address, body.get("metrics"), "admin")
            elif path == "/v1/instances/drain":
                instance = self.admin.on_loop(pool.drain, address)
            else:
                self._json(404, {"error": f"no such endpoint: POST {path}"})
                return
        except ConfigError as exc:
            self._json(400, {"error": str(exc)})
            return
        except KeyError:
            self._json(404, {"error": f"no instance {address}"})
            return
        self._json(200, instance.describe())

    def do_DELETE(self) -> None:  # noqa: N802
        parts = urlsplit(self.path)
        address = parse_qs(parts.query).get("address", [None])[0]
        if parts.path != "/v1/instances" or not address:
            self._json(404, {"error": "expected DELETE /v1/instances?address=host:port"})
            return
        try:
            instance = self.admin.on_loop(self.admin.router.pool.drain, address)
        except KeyError:
            self._json(404, {"error": f"no instance {address}"})
            return
        self._json(200, instance.describe())

    def _body(self) -> dict | None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError as exc:
            self._json(400, {"error": f"the body is not JSON: {exc}"})
            return None
        if not isinstance(body, dict):
            self._json(400, {"error": "the body must be a JSON object"})
            return None
        return body

    def _json(self, status: int, body) -> None:
        self._send(status, json.dumps(body, indent=1).encode() + b"\n", "application/json")

    def _send(self, status: int, payload: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
