"""Plain TCP between pipeline neighbours, for everything except the activations.

MLX's ring backend (0.32) moves data on non-blocking sockets and retries a receive in a
tight loop while it waits: a rank blocked in ``mx.distributed.recv`` spins a core at 100 %,
whether it waits for the next token of a request or for a request that may come in an hour.
So the pipeline never waits inside MLX. Step headers and sampled tokens travel on this
channel, where a read sleeps in the kernel; a rank posts the MLX receive for a hidden state
only after the header announcing it has arrived, when the data is already on its way.

Each rank has one channel: a connection from its left neighbour (it reads headers, or on
rank 0 the sampled tokens, from it) and one to its right neighbour (it writes to it). They
are set up once, after the MLX group is formed: every rank listens on an ephemeral port of
its ring address, sends the port to its right neighbour over MLX, connects to its left
neighbour's port and accepts its right neighbour's connection.

The port is reachable from the network, so a rank sends its right neighbour a random
ticket with the port, and accepts only a connection that presents that ticket first; any
other connection (a port scan, a stranger racing the neighbour) is closed and the rank goes
on waiting for the real one.
"""

import contextlib
import secrets
import socket
import time

CONNECT_TIMEOUT_S = 30.0
TICKET_BYTES = 8
TICKET_WAIT_S = 2.0
"""How long a connection may take to present its ticket (the neighbour sends it at once)."""


class ControlChannelError(ConnectionError):
    """A neighbour closed the channel (it stopped or died) or could not be reached."""


class ControlChannel:
    def __init__(self, host: str) -> None:
        self.host = host
        self._listener = socket.create_server((host, 0))
        self.ticket = secrets.token_bytes(TICKET_BYTES)
        """What the right neighbour must present when it connects (sent to it over MLX)."""
        self._from_left: socket.socket | None = None
        self._to_right: socket.socket | None = None

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def join(
        self,
        left_host: str,
        left_port: int,
        left_ticket: bytes,
        timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        """Connect to the left neighbour's listener (presenting its ticket) and accept the
        right neighbour (the connection that presents ours)."""
        try:
            self._from_left = socket.create_connection((left_host, left_port), timeout=timeout_s)
            self._from_left.sendall(left_ticket)
            self._to_right = self._accept_ticket_holder(time.monotonic() + timeout_s)
        except OSError as error:
            raise ControlChannelError(
                f"cannot link the pipeline's control channel: {error}"
            ) from error
        finally:
            self._listener.close()
        for connection in (self._from_left, self._to_right):
            connection.settimeout(None)
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _accept_ticket_holder(self, deadline: float) -> socket.socket:
        while True:
            self._listener.settimeout(max(deadline - time.monotonic(), 0.001))
            connection, _ = self._listener.accept()
            try:
                connection.settimeout(min(TICKET_WAIT_S, max(deadline - time.monotonic(), 0.001)))
                presented = _read_exactly(connection, TICKET_BYTES)
            except OSError:
                presented = b""
            if secrets.compare_digest(presented, self.ticket):
                return connection
            connection.close()

    def send(self, data: bytes) -> None:
        """To the right neighbour."""
        if self._to_right is None:
            raise ControlChannelError("the control channel is not linked")
        try:
            self._to_right.sendall(data)
        except OSError as error:
            raise ControlChannelError(f"the right neighbour is gone: {error}") from error

    def receive(self, size: int) -> bytes:
        """Exactly ``size`` bytes from the left neighbour, sleeping until they come."""
        if self._from_left is None:
            raise ControlChannelError("the control channel is not linked")
        data = bytearray()
        while len(data) < size:
            try:
                piece = self._from_left.recv(size - len(data))
            except OSError as error:
                raise ControlChannelError(f"the left neighbour is gone: {error}") from error
            if not piece:
                raise ControlChannelError(
                    "the left neighbour closed the pipeline (it stopped or died)"
                )
            data += piece
        return bytes(data)

    def close(self) -> None:
        for connection in (self._from_left, self._to_right, self._listener):
            if connection is not None:
                with contextlib.suppress(OSError):
                    connection.close()


def _read_exactly(connection: socket.socket, size: int) -> bytes:
    """Up to ``size`` bytes: fewer only when the peer closed first."""
    data = bytearray()
    while len(data) < size:
        piece = connection.recv(size - len(data))
        if not piece:
            break
        data += piece
    return bytes(data)
