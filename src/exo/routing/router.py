"""The zenoh session and a bridge from zenoh's callback threads onto the anyio event loop.

Every callback a component registers runs on the event loop thread, so components never
share state across threads. Blocking zenoh calls (open, get, put, reply, close) run on
other threads (:mod:`exo.routing.handoff`, ``anyio.to_thread``): see :class:`Router`.
"""

import asyncio
import contextlib
import json
import math
import re
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import zenoh
from anyio.streams.memory import MemoryObjectReceiveStream
from loguru import logger

from exo.routing.cluster_secret import CLUSTER_USER
from exo.routing.handoff import Inbox, Outbox

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


CONNECT_TIMEOUT_MS = 3000
"""How long opening the session waits for the ``connect`` peers before going on without
them (zenoh keeps trying in the background); a peer that refuses this node, a wrong
cluster secret say, never makes the start hang."""


@dataclass(frozen=True)
class TlsFiles:
    """The files of zenoh's TLS links (``tls/HOST:PORT`` endpoints), PEM."""

    certificate: Path | None = None
    """This node's certificate, presented on the links it accepts (and, with mutual TLS,
    on those it opens)."""
    private_key: Path | None = None
    certificate_authority: Path | None = None
    """The CA that signed the peers' certificates; a node opening a TLS link checks the
    peer's certificate against it. With a certificate and key too, links are mutual."""


@dataclass(frozen=True)
class RouterConfig:
    listen: list[str] = field(default_factory=lambda: ["tcp/0.0.0.0:52414"])
    connect: list[str] = field(default_factory=list[str])
    discovery: bool = True
    secret: str | None = None
    """The cluster secret (zenoh user-password authentication); None: no authentication
    (in-process tests of the transport only)."""
    dictionary_file: Path | None = None
    """zenoh's dictionary of accepted user:password pairs (the secret's one line)."""
    tls: TlsFiles = field(default_factory=TlsFiles)


def check_tls(listen: list[str], connect: list[str], tls: TlsFiles) -> str | None:
    """A sentence saying what TLS setup the endpoints lack, or None."""
    for path in (tls.certificate, tls.private_key, tls.certificate_authority):
        if path is not None and not path.is_file():
            return f"TLS file {path} does not exist"
    if (tls.certificate is None) != (tls.private_key is None):
        return "--tls-cert and --tls-key go together"
    if any(endpoint.startswith("tls/") for endpoint in listen) and tls.certificate is None:
        return "listening on a tls/ endpoint needs --tls-cert and --tls-key"
    if any(endpoint.startswith("tls/") for endpoint in connect) and (
        tls.certificate_authority is None
    ):
        return "connecting to a tls/ endpoint needs --tls-ca (the CA that signed the peer)"
    return None


def _insert(config: zenoh.Config, key: str, value: object) -> None:
    config.insert_json5(key, json.dumps(value))


def _zenoh_config(config: RouterConfig) -> zenoh.Config:
    zenoh_config = zenoh.Config()
    _insert(zenoh_config, "mode", "peer")
    _insert(zenoh_config, "listen/endpoints", config.listen)
    _insert(zenoh_config, "connect/endpoints", config.connect)
    _insert(zenoh_config, "connect/timeout_ms", CONNECT_TIMEOUT_MS)
    _insert(zenoh_config, "connect/exit_on_failure", False)
    _insert(zenoh_config, "scouting/multicast/enabled", config.discovery)
    if config.secret is not None:
        if config.dictionary_file is None:
            raise ValueError("a cluster secret needs its dictionary file")
        _insert(zenoh_config, "transport/auth/usrpwd/user", CLUSTER_USER)
        _insert(zenoh_config, "transport/auth/usrpwd/password", config.secret)
        _insert(zenoh_config, "transport/auth/usrpwd/dictionary_file", str(config.dictionary_file))
    tls = config.tls
    if tls.certificate_authority is not None:
        _insert(
            zenoh_config, "transport/link/tls/root_ca_certificate", str(tls.certificate_authority)
        )
    if tls.certificate is not None and tls.private_key is not None:
        _insert(zenoh_config, "transport/link/tls/listen_certificate", str(tls.certificate))
        _insert(zenoh_config, "transport/link/tls/listen_private_key", str(tls.private_key))
        if tls.certificate_authority is not None:
            _insert(zenoh_config, "transport/link/tls/enable_mtls", True)
            _insert(zenoh_config, "transport/link/tls/connect_certificate", str(tls.certificate))
            _insert(zenoh_config, "transport/link/tls/connect_private_key", str(tls.private_key))
    return zenoh_config


QueryHandler = Callable[[str, bytes | None], bytes | None]
"""(query parameters, payload) -> reply payload, or None for no reply."""


@dataclass(frozen=True)
class Delivery:
    """How a subscription's messages wait for the event loop, and what a full inbox does."""

    capacity: int
    coalesce: bool = False
    """Keep only the newest message per key expression (a value, not a history)."""


EVERY_MESSAGE = Delivery(capacity=20_000)
"""Events and commands: delivered in order; a full inbox refuses new ones, which come back
by their topic's own way (a follower fetches a gap from the log, a worker's outbox resends
an event the master has not indexed, a querier that gets no answer asks again)."""
NEWEST_PER_KEY = Delivery(capacity=4096, coalesce=True)
"""Heartbeats and liveliness: only the newest message of each key waits."""
QUERY_CAPACITY = 1000
"""Queries waiting for the loop; one more is finished unanswered (its querier times out)."""
NO_CONSOLIDATION = zenoh.ConsolidationMode.NONE
"""Replies are handed over as they come (zenoh's default holds them until every queryable
has finished, a frozen one included, to keep the latest per key)."""
OUTBOX_CAPACITY = 100_000
"""Sends waiting for the transport; one more is refused (the topic's way back applies)."""


@dataclass(frozen=True)
class IncomingQuery:
    """A query waiting for its answer (see :meth:`Router.queries`)."""

    parameters: str
    payload: bytes | None
    answer: Callable[[bytes | None], None]
    """Send the reply (None: finish the query without one); from the loop, never waits."""


_Received = tuple[str, bytes | None, zenoh.Query | None]
"""What an inbox holds: (key or query parameters, payload, the query to answer)."""


class Router:
    """Owns the zenoh session. Use ``async with Router(...)`` inside the event loop.

    Threading: zenoh calls its callbacks on its own threads; they only put the message
    into an :class:`~exo.routing.handoff.Inbox`, which the event loop drains. Publishing
    and replying only put a send into an :class:`~exo.routing.handoff.Outbox`, whose thread
    performs it. Queries run in a worker thread. So the loop never waits on the network and
    zenoh's threads never wait on the loop.
    """

    def __init__(self, config: RouterConfig) -> None:
        self._config = config
        self._session: zenoh.Session | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._declared: list[zenoh.Subscriber[None] | zenoh.Queryable[None]] = []
        self._liveliness_tokens: list[zenoh.LivelinessToken] = []
        self._inboxes: list[Inbox[Any]] = []
        self._events_out = Outbox("publish", OUTBOX_CAPACITY)
        self._newest_out = Outbox("publish-newest", OUTBOX_CAPACITY, coalesce=True)
        self._replies_out = Outbox("replies", OUTBOX_CAPACITY)
        self._closed = False

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self._session = await anyio.to_thread.run_sync(zenoh.open, _zenoh_config(self._config))
        except zenoh.ZError as error:
            raise TransportError(_explain_zenoh_error(str(error), self._config)) from error

    @property
    def session(self) -> zenoh.Session:
        if self._session is None:
            raise RuntimeError("router is not open")
        return self._session

    def _inbox(
        self,
        name: str,
        deliver: Callable[[_Received], None],
        delivery: Delivery,
        refused: Callable[[_Received], None] | None = None,
    ) -> Inbox[_Received]:
        if self._loop is None:
            raise RuntimeError("router is not open")
        inbox = Inbox(name, self._loop, deliver, delivery.capacity, delivery.coalesce, refused)
        self._inboxes.append(inbox)
        return inbox

    def queue_counts(self) -> dict[str, tuple[int, int]]:
        """Each inbox's and outbox's (waiting, refused) counts, by name."""
        counts = {inbox.name: (inbox.waiting, inbox.dropped) for inbox in self._inboxes}
        for name, outbox in (
            ("publish", self._events_out),
            ("publish-newest", self._newest_out),
            ("replies", self._replies_out),
        ):
            counts[name] = (outbox.waiting, outbox.dropped)
        return counts

    def subscribe(
        self,
        key_expr: str,
        callback: Callable[[str, bytes], None],
        delivery: Delivery = EVERY_MESSAGE,
    ) -> None:
        """callback(key, payload) on the event loop for every sample matching key_expr."""
        inbox = self._inbox(key_expr, lambda item: callback(item[0], item[1] or b""), delivery)

        def on_sample(sample: zenoh.Sample) -> None:
            key = str(sample.key_expr)
            inbox.put(key, (key, sample.payload.to_bytes(), None))

        self._declared.append(self.session.declare_subscriber(key_expr, on_sample))

    def publish(self, key_expr: str, payload: bytes) -> None:
        """Send in order, never dropped by zenoh (its BLOCK congestion control, waited on by
        the outbox's thread, not by the caller)."""
        if self._session is None or self._closed:
            return
        session = self._session

        def send() -> None:
            session.put(key_expr, payload, congestion_control=zenoh.CongestionControl.BLOCK)

        self._events_out.put(key_expr, send)

    def publish_newest(self, key_expr: str, payload: bytes) -> None:
        """Send a value whose newer version replaces an unsent older one (a heartbeat): at
        high priority, express, and dropped by zenoh rather than waited for under
        congestion (the next one follows soon)."""
        if self._session is None or self._closed:
            return
        session = self._session

        def send() -> None:
            session.put(
                key_expr,
                payload,
                congestion_control=zenoh.CongestionControl.DROP,
                priority=zenoh.Priority.INTERACTIVE_HIGH,
                express=True,
            )

        self._newest_out.put(key_expr, send)

    def declare_queryable(self, key_expr: str, handler: QueryHandler) -> None:
        """handler(parameters, payload) answers each query on the event loop; the reply goes
        out from the replies outbox's thread."""
        self._declare_queryable(
            key_expr, lambda query: query.answer(handler(query.parameters, query.payload))
        )

    def queries(self, key_expr: str) -> MemoryObjectReceiveStream[IncomingQuery]:
        """The queries on key_expr, for a task that answers them one by one and may await
        meanwhile (work in a thread, say); each must be answered (None: no reply)."""
        send, receive = anyio.create_memory_object_stream[IncomingQuery](math.inf)

        def hand_over(query: IncomingQuery) -> None:
            try:
                send.send_nowait(query)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                query.answer(None)

        self._declare_queryable(key_expr, hand_over)
        return receive

    def _declare_queryable(self, key_expr: str, deliver: Callable[[IncomingQuery], None]) -> None:
        replies = self._replies_out

        def answer_with(query: zenoh.Query) -> Callable[[bytes | None], None]:
            def answer(reply: bytes | None) -> None:
                if reply is None:
                    replies.put(key_expr, query.drop)
                    return

                def send() -> None:
                    try:
                        query.reply(key_expr, reply)
                    finally:
                        query.drop()

                if not replies.put(key_expr, send):
                    query.drop()

            return answer

        def on_loop(item: _Received) -> None:
            query = item[2]
            assert query is not None
            deliver(IncomingQuery(item[0], item[1], answer_with(query)))

        def refused(item: _Received) -> None:
            if item[2] is not None:
                item[2].drop()

        inbox = self._inbox(f"{key_expr} (queries)", on_loop, Delivery(QUERY_CAPACITY), refused)

        def on_query(query: zenoh.Query) -> None:
            payload = query.payload.to_bytes() if query.payload is not None else None
            inbox.put(key_expr, (str(query.parameters), payload, query))

        self._declared.append(self.session.declare_queryable(key_expr, on_query))

    async def query(
        self, selector: str, payload: bytes | None = None, timeout_s: float = 2.0
    ) -> list[bytes]:
        """Send a query and gather every successful reply (blocking call in a thread)."""
        session = self.session

        def run() -> list[bytes]:
            replies = session.get(
                selector, payload=payload, timeout=timeout_s, consolidation=NO_CONSOLIDATION
            )
            return [reply.ok.payload.to_bytes() for reply in replies if reply.ok is not None]

        return await anyio.to_thread.run_sync(run, abandon_on_cancel=True)

    async def query_replies(
        self, selector: str, payload: bytes | None = None, timeout_s: float = 2.0
    ) -> AsyncIterator[bytes]:
        """Send a query and yield each successful reply as it arrives, so a caller that has
        what it needs (the master's answer, a majority of votes) need not wait for a peer
        that never answers (a frozen node still holds its queryables)."""
        session = self.session
        loop = asyncio.get_running_loop()
        send, receive = anyio.create_memory_object_stream[bytes](math.inf)

        def hand_over(data: bytes | None) -> None:  # on the loop
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                if data is None:
                    send.close()
                else:
                    send.send_nowait(data)

        def run() -> None:  # a thread of its own: get() blocks until the timeout
            try:
                for reply in session.get(
                    selector, payload=payload, timeout=timeout_s, consolidation=NO_CONSOLIDATION
                ):
                    if reply.ok is not None:
                        loop.call_soon_threadsafe(hand_over, reply.ok.payload.to_bytes())
            except zenoh.ZError as error:
                logger.debug(f"query {selector} failed: {error}")
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    loop.call_soon_threadsafe(hand_over, None)

        threading.Thread(target=run, name="query", daemon=True).start()
        async with receive:
            async for data in receive:
                yield data

    def peer_count(self) -> int:
        """zenoh peers this node has a session with right now."""
        return len(list(self.session.info.peers_zid()))

    def declare_liveliness_token(self, key_expr: str) -> None:
        self._liveliness_tokens.append(self.session.liveliness().declare_token(key_expr))

    def watch_liveliness(self, key_expr: str, callback: Callable[[str, bool], None]) -> None:
        """callback(key, alive) for every token matching key_expr, past and future (a
        token's changes that wait for the loop together give only the newest)."""
        inbox = self._inbox(
            f"{key_expr} (liveliness)",
            lambda item: callback(item[0], item[1] is not None),
            NEWEST_PER_KEY,
        )

        def on_sample(sample: zenoh.Sample) -> None:
            key = str(sample.key_expr)
            inbox.put(key, (key, b"" if sample.kind == zenoh.SampleKind.PUT else None, None))

        subscriber = self.session.liveliness().declare_subscriber(key_expr, on_sample, history=True)
        self._declared.append(subscriber)

    async def close(self) -> None:
        if self._session is None or self._closed:
            return
        self._closed = True
        for inbox in self._inboxes:
            inbox.closed = True
        session = self._session
        tokens = self._liveliness_tokens
        outboxes = (self._events_out, self._newest_out, self._replies_out)

        def close_session() -> None:
            for outbox in outboxes:
                outbox.close()
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
    if "TLS" in message or "tls" in message or "certificate" in message.lower():
        return (
            f"TLS is not set up for {', '.join(config.listen)}: {message.strip()[-200:]} "
            "(give --tls-cert, --tls-key and --tls-ca)"
        )
    if "Can not create a new TCP listener" in message:
        return f"cannot listen on {', '.join(config.listen)}: {message.split(':', 3)[-1].strip()}"
    return f"the zenoh transport could not start: {message}"
