"""uvicorn's HTTP/1.1 protocol with timeouts for clients that send a request too slowly.

uvicorn closes an idle keep-alive connection after `timeout_keep_alive`, but waits forever
for a request: half a header block, or headers and then half a body, hold a connection
(and the app's task) open indefinitely, so a few slow clients can exhaust a server.
`timed_protocol` extends uvicorn's own protocol class (httptools or h11) with two timers:

- header: a request's whole header block must arrive within `header_timeout` seconds of
  its first byte (on a fresh connection, of the connect). A client that has sent part of
  a request then gets 408 and the connection closes; one that has sent nothing is closed
  without a response, as an idle keep-alive connection is, because a 408 written on an
  idle connection can race the client's next request and be read as its answer.
- body: at most `body_timeout` seconds may pass without a byte of the body arriving, so
  an upload that keeps moving passes however long it takes. Only the client's silence
  counts: while the server holds the body back (reading paused because the app has not
  consumed what it has, or `Expect: 100-continue` not answered yet) the clock stands
  still, and it restarts whenever the app asks for more. On expiry: 408 if no response
  has started, then close.

Neither timer runs while a response is being computed or streamed, except that the body
timer keeps watching a body still arriving beside its response.

A 408 goes out with a lingering close: the server sends the response and its end of stream,
then reads and drops whatever the client still sends for up to `LINGER_S` before closing.
A slow client is still sending when its 408 is written, and a socket closed at once answers
late bytes (or closes with unread ones) with a reset, which can destroy the 408 before the
client reads it.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import importlib.util
import json
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.flow_control import FlowControl

logger = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "httptools", "h11")
"""`auto` is uvicorn's own choice: httptools when installed, else h11."""

LINGER_S = 2.0
"""How long a connection answered with 408 stays half-closed, reading and dropping what the
client still sends, before it closes (nginx's lingering close; RFC 9112, section 9.6)."""


def timed_protocol(
    *, header_timeout: float, body_timeout: float, impl: str = "auto"
) -> type[asyncio.Protocol]:
    """A uvicorn HTTP protocol class (pass it as `uvicorn.Config(http=...)`) that enforces
    `header_timeout` and `body_timeout` in seconds; uvicorn's `timeout_keep_alive` still
    applies between requests. Raises ValueError for an unknown or uninstalled `impl`."""
    for name, value in (("header_timeout", header_timeout), ("body_timeout", body_timeout)):
        if not 0 < value < float("inf"):
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown HTTP implementation {impl!r}; expected one of {IMPLEMENTATIONS}")
    if impl == "auto":
        impl = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
    if importlib.util.find_spec(impl) is None:
        raise ValueError(
            f"HTTP implementation {impl!r} is not installed (pip install {impl}); "
            f"use 'auto' to take whichever of httptools and h11 is"
        )
    base = _httptools_protocol() if impl == "httptools" else _h11_protocol()
    attrs = {"header_timeout": float(header_timeout), "body_timeout": float(body_timeout)}
    return type(base.__name__, (base,), attrs)


class Phase(enum.Enum):
    """How far the request being received on a connection has come."""

    IDLE = "idle"
    """No byte of a next request yet."""
    HEADERS = "headers"
    """Part of a header block."""
    BODY = "body"
    """Headers complete, body not yet."""
    DONE = "done"
    """The whole request (its response may still be running)."""


class _ReadyFlowControl(FlowControl):
    """uvicorn's flow control, also telling the protocol each time reading is resumed:
    uvicorn resumes whenever the app asks for more body (and after `100 Continue`), so
    that is when the client's silence starts to count again."""

    def __init__(self, transport: asyncio.Transport, on_resume: Callable[[], None]) -> None:
        super().__init__(transport)
        self._on_resume = on_resume

    def resume_reading(self) -> None:
        super().resume_reading()
        self._on_resume()


class _TimeoutsMixin:
    """The timers, over either uvicorn protocol class; `_phase` says where the parser is."""

    header_timeout: float
    body_timeout: float

    # Provided by uvicorn's protocol classes.
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    flow: FlowControl
    cycle: Any
    client: tuple[str, int] | None
    server_state: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._last_activity = 0.0
        # A fresh connection owes its first header block from the connect on.
        self._first_request = True
        # Handed to a WebSocket protocol: the transport is no longer ours to close.
        self._detached = False
        # Set once a 408 is out: the connection only drains until this closes it.
        self._linger_timer: asyncio.TimerHandle | None = None

    def _phase(self) -> Phase:
        raise NotImplementedError

    # uvicorn's hooks, extended

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self.flow = _ReadyFlowControl(transport, self._server_ready)
        self._last_activity = self.loop.time()
        self._update_timers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if self._linger_timer is not None:
            return  # the rest of a request already answered with 408
        self._last_activity = self.loop.time()
        super().data_received(data)  # type: ignore[misc]
        self._update_timers()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        # The next request may already be partly buffered; its header clock starts now.
        self._update_timers()

    def handle_websocket_upgrade(self, *args: Any) -> None:
        self._detached = True
        self._cancel_timers()
        super().handle_websocket_upgrade(*args)  # type: ignore[misc]

    # The timers

    def _server_ready(self) -> None:
        self._last_activity = self.loop.time()

    def _responding(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _update_timers(self) -> None:
        """Arm or cancel each timer for the connection's state after an event."""
        if self._detached or self.transport.is_closing() or self._linger_timer is not None:
            self._cancel_timers()
            return
        phase = self._phase()
        if phase in (Phase.BODY, Phase.DONE):
            self._first_request = False
        awaiting_headers = phase is Phase.HEADERS or (phase is Phase.IDLE and self._first_request)
        if awaiting_headers and not self._responding():
            if self._header_timer is None:
                # From here on the header timeout governs, not the keep-alive one.
                self._unset_keepalive_if_required()  # type: ignore[attr-defined]
                self._header_timer = self.loop.call_later(
                    self.header_timeout, self._header_timed_out
                )
        elif self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if phase is Phase.BODY:
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.body_timeout, self._check_body)
        elif self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self._detached or self.transport.is_closing() or self._responding():
            return
        if self._phase() is Phase.HEADERS:
            logger.info(
                "%srequest headers incomplete after %gs: 408, closing",
                self._peer(),
                self.header_timeout,
            )
            self._close_with_408("request headers not received in time")
        else:
            logger.debug("%sno request within %gs: closing", self._peer(), self.header_timeout)
            self.transport.close()

    def _check_body(self) -> None:
        """Run about once per `body_timeout` while a body is arriving; closes the connection
        once the client has been silent that long while free to send."""
        self._body_timer = None
        if self._detached or self.transport.is_closing() or self._phase() is not Phase.BODY:
            return
        if self.flow.read_paused or self.cycle.waiting_for_100_continue:
            # The server holds the body back; `_server_ready` restarts the clock.
            delay = self.body_timeout
        else:
            delay = self._last_activity + self.body_timeout - self.loop.time()
            if delay <= 0:
                self._body_timed_out()
                return
        self._body_timer = self.loop.call_later(delay, self._check_body)

    def _body_timed_out(self) -> None:
        cycle = self.cycle
        started = cycle is not None and cycle.response_started
        logger.info(
            "%srequest body stalled for %gs: %sclosing",
            self._peer(),
            self.body_timeout,
            "" if started else "408, ",
        )
        if cycle is not None and not cycle.response_complete:
            # The app sees a disconnect from `receive()` and its writes are dropped, as
            # after the client's own disconnect.
            cycle.disconnected = True
            cycle.message_event.set()
        if started:
            self.transport.close()
        else:
            self._close_with_408("request body stalled")

    def _close_with_408(self, message: str) -> None:
        body = json.dumps(
            {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "request_timeout",
                }
            }
        ).encode()
        content = [b"HTTP/1.1 408 Request Timeout\r\n"]
        for name, value in self.server_state.default_headers:
            content += [name, b": ", value, b"\r\n"]
        content += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(content))
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self._cancel_timers()
        self.transport.write_eof()
        self._linger_timer = self.loop.call_later(LINGER_S, self.transport.close)

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]} - " if self.client else ""


@functools.cache
def _httptools_protocol() -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class TimedHttpToolsProtocol(_TimeoutsMixin, HttpToolsProtocol):
        """httptools reports each stage through a callback."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._parsed = Phase.IDLE

        def _phase(self) -> Phase:
            return self._parsed

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._parsed = Phase.HEADERS

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self._parsed = Phase.BODY

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._parsed = Phase.DONE

    return TimedHttpToolsProtocol


@functools.cache
def _h11_protocol() -> type[asyncio.Protocol]:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(_TimeoutsMixin, H11Protocol):
        """h11 keeps the client's side of the request as a state of its connection."""

        def _phase(self) -> Phase:
            state = self.conn.their_state
            if state is h11.IDLE:
                return Phase.HEADERS if self.conn.trailing_data[0] else Phase.IDLE
            if state is h11.SEND_BODY:
                return Phase.BODY
            return Phase.DONE

    return TimedH11Protocol
