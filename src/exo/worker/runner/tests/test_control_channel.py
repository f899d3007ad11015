"""The control channel links only the neighbour that presents the ticket it was sent."""

import contextlib
import socket
import threading
import time

from exo.worker.runner.control_channel import ControlChannel, ControlChannelError


def link_pair(a: ControlChannel, b: ControlChannel, a_presents: bytes) -> list[BaseException]:
    """A ring of two: each one's left neighbour is the other. ``a_presents`` is what ``a``
    shows ``b``'s listener."""
    errors: list[BaseException] = []

    def join(channel: ControlChannel, other: ControlChannel, ticket: bytes) -> None:
        try:
            channel.join("127.0.0.1", other.port, ticket, timeout_s=3.0)
        except BaseException as error:
            errors.append(error)

    threads = [
        threading.Thread(target=join, args=(a, b, a_presents)),
        threading.Thread(target=join, args=(b, a, a.ticket)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_strangers_on_the_port_are_turned_away_and_the_neighbour_is_linked() -> None:
    a, b = ControlChannel("127.0.0.1"), ControlChannel("127.0.0.1")
    # Before the neighbours join: one stranger says the wrong thing, one says nothing.
    talker = socket.create_connection(("127.0.0.1", a.port))
    talker.sendall(b"12345678" + b"header!!")
    silent = socket.create_connection(("127.0.0.1", a.port))
    try:
        assert link_pair(a, b, b.ticket) == []
        b.send(b"to a")  # b's right neighbour is a
        assert a.receive(4) == b"to a"
        a.send(b"to b")
        assert b.receive(4) == b"to b"
        talker.settimeout(2.0)
        # closed on it: an end of stream, or a reset for the bytes it left unread
        with contextlib.suppress(ConnectionResetError):
            assert talker.recv(16) == b""
    finally:
        for handle in (talker, silent):
            handle.close()
        a.close()
        b.close()


def test_a_wrong_ticket_never_links() -> None:
    a, b = ControlChannel("127.0.0.1"), ControlChannel("127.0.0.1")
    started = time.monotonic()
    try:
        errors = link_pair(a, b, bytes(8))  # not b's ticket
        assert len(errors) == 1 and isinstance(errors[0], ControlChannelError)
        assert time.monotonic() - started < 10.0
    finally:
        a.close()
        b.close()


def test_tickets_differ_between_channels() -> None:
    channels = [ControlChannel("127.0.0.1") for _ in range(2)]
    try:
        assert channels[0].ticket != channels[1].ticket
    finally:
        for channel in channels:
            channel.close()
