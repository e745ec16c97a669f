"""The sandbox: a faithful fake of Onebox's distribution API over real HTTP.

Tests and the demo run it in a thread of their own process
(``start_in_thread``); benchmarks run it as a process of its own
(``python -m fulfilment.sandbox``, which calls ``serve_forever``). What it
speaks and every choice it makes where the real API is unknown is written down
in ``docs/sandbox.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable
from types import TracebackType

from fulfilment.sandbox.admin import SandboxAdmin
from fulfilment.sandbox.api import SandboxApp, SandboxOptions
from fulfilment.sandbox.behaviour import Behaviour
from fulfilment.sandbox.catalogue import Catalogue
from fulfilment.sandbox.faults import FaultPlan
from fulfilment.sandbox.http import serve

__all__ = [
    "Behaviour",
    "Catalogue",
    "FaultPlan",
    "RunningSandbox",
    "SandboxAdmin",
    "SandboxOptions",
    "serve_forever",
    "start_in_thread",
]


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class RunningSandbox:
    """A sandbox serving from a thread of this process; ``stop()`` ends it."""

    def __init__(self, host: str, port: int, options: SandboxOptions,
                 clock: Callable[[], float] | None = None) -> None:
        self._options = options
        self._clock = clock
        self._host = host
        self._wanted_port = port
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="onebox-sandbox", daemon=True)
        self.port = 0
        self.url = ""
        self.admin: SandboxAdmin

    def _start(self) -> None:
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._thread.join()
            raise RuntimeError(f"the sandbox could not start: {self._error}") from self._error
        self.url = _url(self._host, self.port)
        self.admin = SandboxAdmin(self.url)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = exc
        finally:
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()

        def ready(port: int) -> None:
            self.port = port
            self._started.set()

        app = (SandboxApp(self._options) if self._clock is None
               else SandboxApp(self._options, clock=self._clock))
        await serve(app, self._host, self._wanted_port, self._stop_event, ready)

    def stop(self) -> None:
        """Stop serving and wait for the thread; calling it again does nothing."""
        if self._stopped:
            return
        self._stopped = True
        if self._loop is not None and self._stop_event is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop_event.set)
        self._thread.join()
        self.admin.close()

    def __enter__(self) -> RunningSandbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def start_in_thread(
    options: SandboxOptions | None = None, host: str = "127.0.0.1", port: int = 0,
    *, clock: Callable[[], float] | None = None,
) -> RunningSandbox:
    """Start a sandbox in a daemon thread; return once it is listening.

    ``clock`` (default ``time.time``) is the wall clock of orders, baskets and
    tokens: a test may pass one it moves by hand to make expiry and the
    orders-management lag deterministic (it must be safe to read from the
    sandbox's thread). Injected delays still take real time.
    """
    running = RunningSandbox(host, port, options or SandboxOptions(), clock)
    running._start()
    return running


def serve_forever(
    options: SandboxOptions,
    host: str,
    port: int,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve in this thread until SIGTERM or SIGINT; ``ready(url)`` once listening."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        handled = threading.current_thread() is threading.main_thread()
        if handled:
            for signum in signals:
                loop.add_signal_handler(signum, stop.set)

        def on_ready(bound: int) -> None:
            if ready is not None:
                ready(_url(host, bound))

        try:
            await serve(SandboxApp(options), host, port, stop, on_ready)
        finally:
            if handled:
                for signum in signals:
                    loop.remove_signal_handler(signum)

    asyncio.run(main())
