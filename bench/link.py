"""A slow network link between the tools and PostgreSQL, in user space (no kernel netem here).

    link = Link(rtt_ms=30, mbit=100).start()     # listens on 127.0.0.1:link.port
    ... connect through it with sslmode=disable ...
    link.stats()                                  # bytes each way, statements, turns
    link.stop()

Every chunk read from one side is delivered to the other after half the round trip, in
order, and no faster than the link's rate allows (a token bucket per direction, each
direction its own rate: ``mbit`` up and down). That reproduces what a hosted database costs
a tool: a wait per round trip, and bulk data at the link's speed.

It also reads the client's side of the PostgreSQL protocol (which is why the connections
must not use TLS) and counts, with the time each was sent:

* **statements**: simple queries (``Q``) and extended-protocol executions (``E``);
* **turns**: each time a client speaks again after the server answered it, a round trip the
  client waited for (a pipeline or a COPY stream is one turn, not one per message).

Run it alone to put a link in front of a server by hand::

    python bench/link.py --rtt-ms 30 --mbit 100 [--target 127.0.0.1:5432] [--port 6543]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

CHUNK = 64 * 1024


@dataclass
class Counters:
    """What crossed the link: bytes each way, and the client's statements and turns."""

    up: int = 0  # client to server
    down: int = 0  # server to client
    statements: list[float] = field(default_factory=list)  # monotonic time of each
    turns: list[float] = field(default_factory=list)
    texts: list[tuple[float, str]] = field(default_factory=list)  # with capture=True


class _Pipe:
    """One direction of one connection: delay, rate, and in-order delivery."""

    def __init__(
        self, link: Link, direction: str, writer: asyncio.StreamWriter, count: Callable[[int], None]
    ) -> None:
        self.link = link
        self.direction = direction
        self.writer = writer
        self.count = count
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    def send(self, data: bytes) -> None:
        # The rate is the link's, shared by every connection going the same way.
        start = max(time.monotonic(), self.link.free_at[self.direction])
        done = start + len(data) * 8 / self.link.bits_per_second
        self.link.free_at[self.direction] = done
        self.queue.put_nowait((done + self.link.one_way, data))

    async def deliver(self) -> None:
        while True:
            due, data = await self.queue.get()
            if not data:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self.writer.write(data)
            self.count(len(data))
            await self.writer.drain()
        with contextlib.suppress(OSError):
            self.writer.close()


class _Frontend:
    """Parses the client's messages as they stream by, counting statements and turns."""

    def __init__(self, counters: Counters, answered: list[bool], capture: bool) -> None:
        self.counters = counters
        self.capture = capture
        self.prepared: dict[bytes, str] = {}
        self.bound = ""
        self.answered = answered  # set when the server sent something since the client spoke
        self.buffer = b""
        self.started = False  # past the startup message (which has no type byte)

    def _capture(self, kind: bytes, body: bytes, now: float) -> None:
        """Keep each statement's text: a simple query's, or an execution's (by the prepared
        statement its portal was bound to: psycopg prepares what it runs often)."""
        if kind == b"Q":
            self.counters.texts.append((now, body.split(b"\0", 1)[0].decode("utf-8", "replace")))
        elif kind == b"P":  # statement name, then the query
            name, rest = body.split(b"\0", 1)
            self.prepared[name] = rest.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif kind == b"B":  # portal name, then statement name
            statement = body.split(b"\0", 2)[1]
            self.bound = self.prepared.get(statement, "?")
        elif kind == b"E":
            self.counters.texts.append((now, self.bound))

    def feed(self, data: bytes) -> None:
        now = time.monotonic()
        if self.answered[0]:
            self.counters.turns.append(now)
            self.answered[0] = False
        self.buffer += data
        while True:
            if not self.started:
                if len(self.buffer) < 4:
                    return
                (length,) = struct.unpack("!I", self.buffer[:4])
                if len(self.buffer) < length:
                    return
                code = struct.unpack("!I", self.buffer[4:8])[0] if length >= 8 else 0
                self.buffer = self.buffer[length:]
                # SSLRequest / GSSENCRequest are followed by another startup message
                self.started = code not in (80877103, 80877104)
                continue
            if len(self.buffer) < 5:
                return
            kind = self.buffer[:1]
            (length,) = struct.unpack("!I", self.buffer[1:5])
            if len(self.buffer) < 1 + length:
                return
            if kind in (b"Q", b"E"):
                self.counters.statements.append(now)
            if self.capture:
                self._capture(kind, self.buffer[5 : 1 + length], now)
            self.buffer = self.buffer[1 + length :]


class Link:
    """A TCP proxy with a round-trip time and a rate per direction (see the module doc)."""

    def __init__(
        self,
        rtt_ms: float,
        mbit: float,
        target: str = "127.0.0.1:5432",
        port: int = 0,
        *,
        capture: bool = False,
    ) -> None:
        self.capture = capture  # keep each statement's text (Counters.texts)
        self.one_way = rtt_ms / 2000
        self.bits_per_second = mbit * 1_000_000
        host, _, target_port = target.rpartition(":")
        self.target = (host or "127.0.0.1", int(target_port))
        self.port = port
        self.counters = Counters()
        self.free_at = {"up": 0.0, "down": 0.0}  # when each direction is free again
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Link:
        self._thread.start()
        self._ready.wait()
        return self

    def stop(self) -> None:
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        self._thread.join(timeout=5)

    async def _shutdown(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.get_running_loop().stop()

    def reset(self) -> None:
        with self._lock:
            self.counters = Counters()

    def stats(self) -> Counters:
        with self._lock:
            c = self.counters
            return Counters(c.up, c.down, list(c.statements), list(c.turns), list(c.texts))

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._connection, "127.0.0.1", self.port)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            self._loop.close()

    def _add(self, direction: str, n: int) -> None:
        with self._lock:
            setattr(self.counters, direction, getattr(self.counters, direction) + n)

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter):
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        answered = [False]
        frontend = _Frontend(self.counters, answered, self.capture)
        up = _Pipe(self, "up", server_w, lambda n: self._add("up", n))
        down = _Pipe(self, "down", client_w, lambda n: self._add("down", n))

        async def pump(reader: asyncio.StreamReader, pipe: _Pipe, client_side: bool) -> None:
            try:
                while data := await reader.read(CHUNK):
                    if client_side:
                        with self._lock:
                            frontend.counters = self.counters
                            frontend.feed(data)
                    else:
                        answered[0] = True
                    pipe.send(data)
            except OSError:
                pass
            pipe.queue.put_nowait((0.0, b""))

        with contextlib.suppress(asyncio.CancelledError):  # stop() cancels every connection
            await asyncio.gather(
                pump(client_r, up, True),
                pump(server_r, down, False),
                up.deliver(),
                down.deliver(),
                return_exceptions=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rtt-ms", type=float, default=30)
    parser.add_argument("--mbit", type=float, default=100)
    parser.add_argument("--target", default="127.0.0.1:5432")
    parser.add_argument("--port", type=int, default=6543)
    args = parser.parse_args()
    link = Link(args.rtt_ms, args.mbit, args.target, args.port).start()
    print(f"listening on 127.0.0.1:{link.port} -> {args.target} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(10)
            s = link.stats()
            print(
                f"up {s.up:,} B, down {s.down:,} B, {len(s.statements):,} statements, "
                f"{len(s.turns):,} turns",
                flush=True,
            )
    except KeyboardInterrupt:
        link.stop()


if __name__ == "__main__":
    main()
