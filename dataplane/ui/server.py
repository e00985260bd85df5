"""The service map's web server (`l7lab ui`): the page, a JSON API over a lab's flow records,
and live updates as Server-Sent Events. aiohttp, loopback only.

    GET /                       the page (static/index.html; its script and style under /static/)
    GET /api/graph              {"lab", "lab_up", "nodes": [...], "edges": [...], "classes": [...]}
    GET /api/edge?from=A&to=B   one edge's summary and its recent records, newest first (404 if none)
    GET /api/events             text/event-stream: one `data:` JSON line per batch of changes,
                                {"nodes": [...], "edges": [...]} (the edges that changed, whole),
                                {"lab_up": bool} when the lab's directory comes or goes, or
                                {"resync": true} when this client fell behind or the lab's nodes
                                changed (a pod relabelled): fetch the graph again

The lab's map state (/run/l7lab/<lab>/policy.json, which the lab rewrites on every `l7lab
apply`) is read at start and again when the file changes (`PolicyFile`): it names the policies
a default deny is due to.

The server reads the lab's record files (`RecordTail`: flows.jsonl and l7-events.jsonl under
/run/l7lab/<lab>/) from near their end, `START_RECORDS` of each, so starting is quick however
long the lab has run, then follows them every `POLL_SECONDS`. What it keeps is bounded by the
`ServiceMap` (dataplane/ui/graph.py); each live client has a bounded queue, and a client that
cannot keep up is told to resync instead of being buffered for.

It only reads files, so it runs in the root namespace. It listens on loopback only
(`parse_listen`), and answers only requests whose Host is a loopback name, so a web page
elsewhere cannot read the lab's flows through a DNS name rebound to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import signal
import socket
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from ..errors import L7LabError
from ..flows import RecordTail
from ..mapstate import MapState
from ..metrics import parse_listen as parse_loopback_listen
from .graph import MapNode, ServiceMap

STATIC_DIR = Path(__file__).resolve().parent / "static"
START_RECORDS = 5000  # records read back from the end of each file at start
POLL_SECONDS = 0.25  # how often the record files are read for new records
NODES_EVERY = 8  # polls between two looks at the lab's record (its pods' labels may change)
HEARTBEAT_SECONDS = 15.0  # an idle event stream sends a comment this often (finds closed clients)
CLIENT_QUEUE = 256  # updates buffered per live client before it is told to resync

# The page's own files only: no inline script or style, nothing from elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

MAP_KEY: web.AppKey[ServiceMap] = web.AppKey("service_map", ServiceMap)
HUB_KEY: web.AppKey["Hub"] = web.AppKey("hub")
INFO_KEY: web.AppKey[dict[str, Any]] = web.AppKey("info", dict)


def parse_listen(text: str) -> tuple[str, int]:
    """--listen HOST:PORT on loopback (the same rule as the agent's --metrics)."""
    return parse_loopback_listen(text, flag="--listen")


def bind_listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything else starts, so a busy port is a clear
    error at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise L7LabError(f"--listen {host}:{port}: the port is already in use; choose another with "
                             f"--listen 127.0.0.1:PORT") from None
        raise L7LabError(f"--listen {host}:{port}: cannot listen there ({exc.strerror})") from None
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class PolicyFile:
    """The lab's map state from its policy.json, read again whenever the file is replaced
    (the lab writes it whole and renames it into place, so a read never sees half of it)."""

    NAME = "policy.json"

    def __init__(self, lab_dir: Path) -> None:
        self.path = lab_dir / self.NAME
        self.seen: tuple[int, int, int] | None = None

    def changed(self) -> tuple[bool, MapState | None]:
        """(whether the file changed since the last call, the state it now holds: None when it
        is gone or unreadable, e.g. a lab without the L7 proxy)."""
        try:
            st = self.path.stat()
        except OSError:
            stamp = None
        else:
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self.seen:
            return False, None
        self.seen = stamp
        if stamp is None:
            return True, None
        try:
            return True, MapState.from_json(json.loads(self.path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"l7lab ui: cannot read {self.path} ({exc}); policies of default denies are not named",
                  flush=True)
            return True, None


class Hub:
    """The live clients' queues; `publish` never waits for a client."""

    def __init__(self) -> None:
        self.queues: set[asyncio.Queue[dict[str, Any] | None]] = set()

    def subscribe(self) -> asyncio.Queue[dict[str, Any] | None]:
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(CLIENT_QUEUE)
        self.queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        self.queues.discard(queue)

    def publish(self, message: dict[str, Any] | None) -> None:
        """Send to every client; a client whose queue is full loses what it holds and is told
        to fetch the whole graph again. `None` ends every stream (shutdown)."""
        for queue in list(self.queues):
            if queue.full():
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait({"resync": True})
            queue.put_nowait(message)


def _is_loopback_host(host_header: str) -> bool:
    host = host_header.strip()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@web.middleware
async def loopback_host_only(request: web.Request,
                             handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    if not _is_loopback_host(request.headers.get("Host", "")):
        return web.Response(status=403, text="l7lab ui answers only to loopback names (127.0.0.1, localhost, [::1])\n")
    return await handler(request)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)


# --------------------------------------------------------------------------- handlers


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def graph(request: web.Request) -> web.Response:
    return web.json_response({**request.app[INFO_KEY], **request.app[MAP_KEY].graph()})


async def edge(request: web.Request) -> web.Response:
    source, destination = request.query.get("from"), request.query.get("to")
    if not source or not destination:
        return web.json_response({"error": "expected ?from=NODE&to=NODE"}, status=400)
    detail = request.app[MAP_KEY].edge(source, destination)
    if detail is None:
        return web.json_response({"error": f"no flows from {source} to {destination}"}, status=404)
    return web.json_response(detail)


async def events(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    hub = request.app[HUB_KEY]
    queue = hub.subscribe()
    try:
        await response.write(b"retry: 1000\n\n")
        while True:
            try:
                message = await asyncio.wait_for(queue.get(), HEARTBEAT_SECONDS)
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            if message is None:
                break
            await response.write(b"data: " + json.dumps(message).encode() + b"\n\n")
    except (ConnectionResetError, ConnectionError):
        pass  # the page was closed
    finally:
        hub.unsubscribe(queue)
    return response


# --------------------------------------------------------------------------- the app


async def follow_records(app: web.Application, tail: RecordTail, lab_dir: Path,
                         lab_nodes: Callable[[], list[MapNode] | None] | None,
                         policy_file: PolicyFile) -> None:
    """Read new records, count them into the map, and tell the live clients what changed;
    every `NODES_EVERY` polls, take the lab's nodes again from `lab_nodes` (None: the lab's
    record is gone, keep the last ones) and its map state from `policy_file` (kept when the
    file is gone), and have the clients reload the graph if either changed."""
    service_map, hub, info = app[MAP_KEY], app[HUB_KEY], app[INFO_KEY]
    polls = 0
    while True:
        await asyncio.sleep(POLL_SECONDS)
        polls += 1
        try:
            if polls % NODES_EVERY == 0:
                resync = False
                if lab_nodes is not None:
                    nodes = await asyncio.to_thread(lab_nodes)
                    resync = nodes is not None and service_map.set_nodes(nodes)
                changed, state = await asyncio.to_thread(policy_file.changed)
                if changed and state is not None:
                    service_map.set_policy_state(state)
                    resync = True
                if resync:
                    hub.publish({"resync": True})
            try:
                records = await asyncio.to_thread(tail.read)
            except OSError:
                records = []  # the lab is going down under us: keep the map as it was
            keys = service_map.add(records)
            if keys:
                hub.publish(service_map.update(keys))
            lab_up = lab_dir.is_dir()
            if lab_up != info["lab_up"]:
                info["lab_up"] = lab_up
                hub.publish({"lab_up": lab_up})
        except Exception:  # noqa: BLE001 - a bug here must not freeze the page for good: say it, go on
            traceback.print_exc()


def make_app(lab: str, lab_dir: Path, service_map: ServiceMap, start_records: int = START_RECORDS,
             lab_nodes: Callable[[], list[MapNode] | None] | None = None) -> web.Application:
    """The server of one lab's map: reads the last `start_records` records of each file before
    it answers, then follows the files (and the lab's nodes through `lab_nodes`, if given)."""
    app = web.Application(middlewares=[loopback_host_only])
    app[MAP_KEY] = service_map
    app[HUB_KEY] = Hub()
    app[INFO_KEY] = {"lab": lab, "lab_up": lab_dir.is_dir()}
    app.on_response_prepare.append(_security_headers)

    async def records_context(app: web.Application) -> AsyncIterator[None]:
        tail = RecordTail(lab_dir)
        tail.start_at_last(start_records)
        service_map.add(await asyncio.to_thread(tail.read))
        policy_file = PolicyFile(lab_dir)
        _, state = await asyncio.to_thread(policy_file.changed)
        service_map.set_policy_state(state)
        task = asyncio.create_task(follow_records(app, tail, lab_dir, lab_nodes, policy_file))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def end_streams(app: web.Application) -> None:
        app[HUB_KEY].publish(None)

    app.cleanup_ctx.append(records_context)
    app.on_shutdown.append(end_streams)
    app.router.add_get("/", index)
    app.router.add_get("/api/graph", graph)
    app.router.add_get("/api/edge", edge)
    app.router.add_get("/api/events", events)
    app.router.add_static("/static/", STATIC_DIR)
    return app


async def serve(app: web.Application, sock: socket.socket, ready: Callable[[str], None]) -> None:
    """Serve `app` on the bound `sock` until SIGINT or SIGTERM; `ready(url)` once it answers."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        ready(url_of(sock))
        await stop.wait()
    finally:
        await runner.cleanup()


def run(lab: str, lab_dir: Path, service_map: ServiceMap, sock: socket.socket, ready: Callable[[str], None],
        lab_nodes: Callable[[], list[MapNode] | None] | None = None) -> None:
    """Serve the map of lab `lab` on `sock` until interrupted (Ctrl-C or SIGTERM end it cleanly)."""
    asyncio.run(serve(make_app(lab, lab_dir, service_map, lab_nodes=lab_nodes), sock, ready))
