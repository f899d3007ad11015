"""The zenoh session and a bridge from zenoh's callback threads onto the anyio event loop.

Every callback a component registers runs on the event loop thread, so components never
share state across threads. Blocking zenoh calls (open, get, close) go through
``anyio.to_thread``.
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import zenoh
from loguru import logger

ENDPOINT_PATTERN = re.compile(r"^(tcp|udp|tls|quic|ws|unixsock-stream)/\S+$")
TCP_LIKE_PATTERN = re.compile(r"^(tcp|udp|tls|quic|ws)/(\[[0-9a-fA-F:]+\]|[^/:\s]+):(\d{1,5})$")


class TransportError(Exception):
    """The transport could not start (port in use, bad endpoint); the message is for users."""


def validate_endpoint(endpoint: str) -> str | None:
    """None when the endpoint looks valid, else a sentence saying what is wrong."""
    if not ENDPOINT_PATTERN.match(endpoint):
        return (
            f"'{endpoint}' is not a zenoh endpoint; expected PROTOCOL/HOST:PORT, "
            "e.g. tcp/127.0.0.1:52414"
        )
    if endpoint.startswith("unixsock-stream/"):
        return None
    match = TCP_LIKE_PATTERN.match(endpoint)
    if match is None or not 0 < int(match.group(3)) < 65536:
        return f"'{endpoint}' needs a host and a port between 1 and 65535"
    return None


@dataclass(frozen=True)
class RouterConfig:
    listen: list[str] = field(default_factory=lambda: ["tcp/0.0.0.0:52414"])
    connect: list[str] = field(default_factory=list[str])
    discovery: bool = True


def _zenoh_config(config: RouterConfig) -> zenoh.Config:
    zenoh_config = zenoh.Config()
    zenoh_config.insert_json5("mode", '"peer"')
    zenoh_config.insert_json5("listen/endpoints", json.dumps(config.listen))
    zenoh_config.insert_json5("connect/endpoints", json.dumps(config.connect))
    zenoh_config.insert_json5("scouting/multicast/enabled", json.dumps(config.discovery))
    return zenoh_config


QueryHandler = Callable[[str, bytes | None], bytes | None]
"""(query parameters, payload) -> reply payload, or None for no reply."""


class Router:
    """Owns the zenoh session. Use ``async with Router(...)`` inside the event loop."""

    def __init__(self, config: RouterConfig) -> None:
        self._config = config
        self._session: zenoh.Session | None = None
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self._declared: list[zenoh.Subscriber[None] | zenoh.Queryable[None]] = []
        self._liveliness_tokens: list[zenoh.LivelinessToken] = []
        self._closed = False

    async def open(self) -> None:
        self._token = anyio.lowlevel.current_token()
        try:
            self._session = await anyio.to_thread.run_sync(zenoh.open, _zenoh_config(self._config))
        except zenoh.ZError as error:
            raise TransportError(_explain_zenoh_error(str(error), self._config)) from error

    @property
    def session(self) -> zenoh.Session:
        if self._session is None:
            raise RuntimeError("router is not open")
        return self._session

    def _on_loop(self, callback: Callable[[], None]) -> None:
        """Run callback on the event loop thread, from a zenoh thread."""
        if self._closed:
            return
        try:
            anyio.from_thread.run_sync(callback, token=self._token)
        except RuntimeError:
            pass  # the loop is shutting down
        except Exception as error:  # a component bug must not kill zenoh's thread
            logger.opt(exception=error).error("error in a transport callback")

    def subscribe(self, key_expr: str, callback: Callable[[str, bytes], None]) -> None:
        def on_sample(sample: zenoh.Sample) -> None:
            key = str(sample.key_expr)
            payload = sample.payload.to_bytes()
            self._on_loop(lambda: callback(key, payload))

        self._declared.append(self.session.declare_subscriber(key_expr, on_sample))

    def publish(self, key_expr: str, payload: bytes) -> None:
        if self._session is None or self._closed:
            return
        # BLOCK, not zenoh's default DROP: an event must not vanish under a burst.
        self._session.put(key_expr, payload, congestion_control=zenoh.CongestionControl.BLOCK)

    def declare_queryable(self, key_expr: str, handler: QueryHandler) -> None:
        def on_query(query: zenoh.Query) -> None:
            parameters = str(query.parameters)
            payload = query.payload.to_bytes() if query.payload is not None else None
            result: list[bytes | None] = [None]

            def answer() -> None:
                result[0] = handler(parameters, payload)

            self._on_loop(answer)
            if result[0] is not None:
                query.reply(query.key_expr, result[0])

        self._declared.append(self.session.declare_queryable(key_expr, on_query))

    async def query(
        self, selector: str, payload: bytes | None = None, timeout_s: float = 2.0
    ) -> list[bytes]:
        """Send a query and gather every successful reply (blocking call in a thread)."""
        session = self.session

        def run() -> list[bytes]:
            replies = session.get(selector, payload=payload, timeout=timeout_s)
            return [reply.ok.payload.to_bytes() for reply in replies if reply.ok is not None]

        return await anyio.to_thread.run_sync(run, abandon_on_cancel=True)

    def declare_liveliness_token(self, key_expr: str) -> None:
        self._liveliness_tokens.append(self.session.liveliness().declare_token(key_expr))

    def watch_liveliness(self, key_expr: str, callback: Callable[[str, bool], None]) -> None:
        """callback(key, alive) for every token matching key_expr, past and future."""

        def on_sample(sample: zenoh.Sample) -> None:
            key = str(sample.key_expr)
            alive = sample.kind == zenoh.SampleKind.PUT
            self._on_loop(lambda: callback(key, alive))

        subscriber = self.session.liveliness().declare_subscriber(key_expr, on_sample, history=True)
        self._declared.append(subscriber)

    async def close(self) -> None:
        if self._session is None or self._closed:
            return
        self._closed = True
        session = self._session
        tokens = self._liveliness_tokens

        def close_session() -> None:
            for token in tokens:
                token.undeclare()
            session.close()

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(close_session)


def _explain_zenoh_error(message: str, config: RouterConfig) -> str:
    if "Address already in use" in message:
        return f"a listen address is already in use ({', '.join(config.listen)}); pick another port with --listen"
    if "Endpoints must be of the form" in message or "Json5Err" in message:
        return "an endpoint is malformed; expected PROTOCOL/HOST:PORT such as tcp/127.0.0.1:52414"
    if "Can not create a new TCP listener" in message:
        return f"cannot listen on {', '.join(config.listen)}: {message.split(':', 3)[-1].strip()}"
    return f"the zenoh transport could not start: {message}"
