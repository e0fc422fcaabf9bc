"""Serve an app from a background thread (its own event loop): for notebooks, tests and benchmarks.

    with BackgroundServer(create_app(config, served)) as server:
        openai.OpenAI(base_url=server.url + "/v1", api_key="-")...
"""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web

from scalellm_jax.server.app import start_runner


class BackgroundServer:
    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0):
        self.app = app
        self._host, self._port, self._timeout = host, port, timeout
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="scalellm-http", daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def start(self) -> BackgroundServer:
        self._thread.start()
        host, port = self.call(self._start())
        self.url = f"http://{host}:{port}"
        return self

    async def _start(self):
        self._runner = await start_runner(self.app)
        await web.TCPSite(self._runner, self._host, self._port).start()
        return self._runner.addresses[0][:2]

    def call(self, coro):
        """Run a coroutine on the server's loop and return its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(self._timeout)

    def stop(self) -> None:
        if self._thread.is_alive():
            if self._runner is not None:
                self.call(self._runner.cleanup())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(self._timeout)
        self.loop.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
