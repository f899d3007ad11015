"""The zenoh session and a bridge from zenoh's callback threads onto the anyio event loop.

Every callback a component registers runs on the event loop thread, so components never
share state across threads. Blocking zenoh calls (open, get, close) go through
``anyio.to_thread``.
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import zenoh
from loguru import logger

from exo.routing.cluster_secret import CLUSTER_USER

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

    def peer_count(self) -> int:
        """zenoh peers this node has a session with right now."""
        return len(list(self.session.info.peers_zid()))

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
    if "TLS" in message or "tls" in message or "certificate" in message.lower():
        return (
            f"TLS is not set up for {', '.join(config.listen)}: {message.strip()[-200:]} "
            "(give --tls-cert, --tls-key and --tls-ca)"
        )
    if "Can not create a new TCP listener" in message:
        return f"cannot listen on {', '.join(config.listen)}: {message.split(':', 3)[-1].strip()}"
    return f"the zenoh transport could not start: {message}"
