"""Fixtures: one loop thread with a recording backend and an in-process proxy per module."""

from __future__ import annotations

import asyncio

import pytest

from proxy.events import EventLog
from proxy.server import ProxyServer
from proxy.state import Snapshot
from tests.support.http import Client
from tests.support.loopback import ADDRESSES, Backend, LoopThread, engine, remap


class Lab:
    """Backend on 127.0.0.3 (pod shop/backend), proxy on 127.0.0.1 whose original destination is
    the backend; clients connect from 127.0.0.2 (shop/frontend) or 127.0.0.4 (shop/stranger)."""

    def __init__(self) -> None:
        self.loop = LoopThread()
        self.backend = Backend(ADDRESSES["shop/backend"])
        self.loop.run(self.backend.start())
        self.engine = engine(self.backend.port)
        self.state = remap(self.engine.map_state(), self.engine)
        self.proxy = ProxyServer(Snapshot(self.state), "127.0.0.1", 0, transparent=False, mark=False,
                                 original_dst=(self.backend.host, self.backend.port), events=EventLog())
        self.loop.run(self.proxy.start())

    def client(self, source: str = "127.0.0.2") -> Client:
        return Client(self.proxy.port, source)

    def reset(self) -> None:
        self.loop.run(self._settle())
        self.backend.clear()
        self.proxy.events.records.clear()

    async def _settle(self) -> None:
        """End what earlier tests left open, so no late record lands in the next test's log."""
        for _ in range(200):
            if not self.proxy._conns:
                return
            await asyncio.sleep(0.01)
        for task in list(self.proxy._conns):
            task.cancel()
        await asyncio.gather(*self.proxy._conns, return_exceptions=True)

    def close(self) -> None:
        self.loop.run(self.proxy.stop())
        self.loop.run(self.backend.stop())
        self.loop.close()


@pytest.fixture(scope="module")
def lab():
    lab = Lab()
    yield lab
    lab.close()


@pytest.fixture
def fresh(lab):
    lab.reset()
    return lab
