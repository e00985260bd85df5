"""Backends for the upgrade tests (loopback unit tests and real traffic in a lab's pod).

* h2c: hypercorn (a well-kept ASGI server) serving an app that answers every request
  `200 seen METHOD PATH` and appends `METHOD PATH HTTP/VERSION` to a log file. hypercorn
  really honours `Upgrade: h2c`: it answers 101 and then speaks HTTP/2 on the same connection,
  so a proxy that forwarded the upgrade would let every later HTTP/2 request through unchecked.
  The log tells exactly which requests reached the backend, whatever protocol carried them.
* fast-websocket: a WebSocket server (wsproto for the protocol) that writes its 101 and a first
  message (`hello`) in ONE write, as a fast backend does, then echoes every message; it logs
  the handshake request line and every message it receives.

Run in a pod's namespace by the kernel tests:
    python -m tests.upgrade_backends h2c|fast-websocket HOST PORT LOGFILE
(prints READY once listening); started in-process on loopback by the unit tests.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Awaitable, Callable

from hypercorn.asyncio import serve
from hypercorn.config import Config
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Message, Request, TextMessage

GREETING = "hello"


def _append(log_path: str, line: str) -> None:
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(line + "\n")


def h2c_app(log_path: str) -> Callable[..., Awaitable[None]]:
    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return  # a websocket request is refused (hypercorn answers it 403)
        _append(log_path, f"{scope['method']} {scope['path']} HTTP/{scope['http_version']}")
        while (await receive()).get("more_body"):
            pass  # drain the request body
        body = f"seen {scope['method']} {scope['path']}".encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    return app


def listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def serve_h2c(sock: socket.socket, log_path: str, stop: asyncio.Event) -> None:
    """hypercorn on an already listening socket until `stop` is set."""
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns the socket from here on
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.1
    await serve(h2c_app(log_path), config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


async def fast_websocket(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, log_path: str) -> None:
    """One connection: handshake, then 101 + GREETING in a single write, then echo."""
    ws = WSConnection(ConnectionType.SERVER)
    try:
        while True:
            data = await reader.read(65536)
            ws.receive_data(data or None)
            out = b""
            for event in ws.events():
                if isinstance(event, Request):
                    _append(log_path, f"HANDSHAKE GET {event.target}")
                    out += ws.send(AcceptConnection()) + ws.send(Message(data=GREETING))
                elif isinstance(event, TextMessage):
                    _append(log_path, f"MESSAGE {event.data}")
                    out += ws.send(Message(data=event.data))
                elif isinstance(event, CloseConnection):
                    out += ws.send(event.response())
            if out:
                writer.write(out)  # the 101 and the first frame leave in one write
                await writer.drain()
            if not data:
                return
    except (ConnectionError, OSError):
        pass
    except Exception as exc:  # noqa: BLE001 - a protocol error ends this connection only
        _append(log_path, f"ERROR {exc!r}")
    finally:
        writer.close()


async def serve_fast_websocket(sock: socket.socket, log_path: str) -> asyncio.base_events.Server:
    return await asyncio.start_server(lambda r, w: fast_websocket(r, w, log_path), sock=sock)


async def _main(kind: str, host: str, port: int, log_path: str) -> None:
    sock = listening_socket(host, port)
    stop = asyncio.Event()
    if kind == "h2c":
        task = asyncio.create_task(serve_h2c(sock, log_path, stop))
    elif kind == "fast-websocket":
        server = await serve_fast_websocket(sock, log_path)
        task = asyncio.create_task(server.serve_forever())
    else:
        raise SystemExit(f"unknown backend {kind!r}: h2c or fast-websocket")
    print("READY", flush=True)
    await task


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
