"""A real serving stack (repository, data plane, gRPC + REST servers) on loopback, in a background thread."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from edge_agent.dataplane import DataPlane
from edge_agent.repository import ModelRepository
from edge_agent.server import ServingApp, ServingConfig


@dataclass
class RunningServer:
    """Ports of a running stack, and a way to call into its event loop from a test."""

    http_port: int
    grpc_port: int
    dataplane: DataPlane
    loop: asyncio.AbstractEventLoop

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)


@contextmanager
def serving(workdir: Path, bundles: list[Path], **config: Any) -> Iterator[RunningServer]:
    """Serve ``bundles`` until the block ends; ``config`` goes to :class:`ServingConfig`."""
    loop = asyncio.new_event_loop()
    started: dict[str, Any] = {}
    stop = threading.Event()

    async def main() -> None:
        repository = ModelRepository(workdir)
        dataplane = DataPlane(repository)
        app = ServingApp(dataplane, ServingConfig(**config))
        try:
            for bundle in bundles:
                await repository.load_bundle(bundle)
            await app.start()
            started["server"] = RunningServer(app.http_port, app.grpc_port, dataplane, loop)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread, which raises it
            started["error"] = exc
            await repository.close()
            return
        finally:
            ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await app.stop(grace=1.0)
        await repository.close()

    ready = threading.Event()
    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    ready.wait(60)
    if "error" in started:
        thread.join()
        loop.close()
        raise started["error"]
    try:
        yield started["server"]
    finally:
        stop.set()
        thread.join(30)
        loop.close()


def digits_bundle(model: Path, digits: Any, folder: Path) -> Path:
    """The digits MLP packaged as ``digits`` (fp32, with an input sample), signed by the test's key."""
    from packager.packaging import package

    sample = folder / "sample.json"
    sample.write_text(json.dumps({"data": digits.x_test[:2].tolist()}))
    return package(model, "cpu-x86_64", folder / "digits.edb", quantize="none", input_sample=sample,
                   name="digits").bundle_path


def post_json(url: str, document: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST a JSON document; returns (status, parsed body) without raising on 4xx/5xx."""
    import urllib.error
    import urllib.request

    data = document if isinstance(document, bytes) else json.dumps(document).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET a URL; returns (status, body) without raising on 4xx/5xx."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class _DripHandler(BaseHTTPRequestHandler):
    """Announces the whole body, then sends it one byte every ``gap`` seconds."""

    server: _DripServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        for byte in self.server.body:
            if self.server.stopping.wait(self.server.gap):
                return
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:  # the client gave up
                return


class _DripServer(ThreadingHTTPServer):
    daemon_threads = True
    body = b""
    gap = 0.1
    stopping: threading.Event


@contextmanager
def dripping_server(body: bytes, gap: float = 0.1) -> Iterator[str]:
    """A stuck or hostile bundle server on loopback: yields its base URL; any path drips ``body``."""
    httpd = _DripServer(("127.0.0.1", 0), _DripHandler)
    httpd.body, httpd.gap, httpd.stopping = body, gap, threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.stopping.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def unreachable_kubeconfig(path: Path, port: int) -> Path:
    """A kubeconfig whose API server is ``127.0.0.1:port``, where nothing answers."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "here",
        "clusters": [{"name": "here", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "me", "user": {"token": "t"}}],
        "contexts": [{"name": "here", "context": {"cluster": "here", "user": "me"}}],
    }))
    return path
