"""What the DICOM node changes in pynetdicom's reading of an association, pinned: the
pynetdicom internals it sets still exist and are still used, its socket reader keeps
pynetdicom's contract, and its File Meta Information is pynetdicom's byte for byte."""

from __future__ import annotations

import inspect
import socket
import threading

import pytest
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket

from triage.ingest.receiver import _reader, file_meta


def test_the_pynetdicom_internals_the_receiver_sets_are_still_used() -> None:
    # the DUL's poll interval is read at every turn of its reactor...
    assert "time.sleep(self._run_loop_delay)" in inspect.getsource(
        DULServiceProvider.run_reactor)
    # ...and PDUs are read through the association socket's recv(), which the receiver
    # replaces on each accepted association
    assert "self.socket.recv(" in inspect.getsource(DULServiceProvider._read_pdu_data)
    assert list(inspect.signature(AssociationSocket.recv).parameters) == ["self", "nr_bytes"]


class _Wrapper:
    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock


def test_the_socket_reader_reads_exactly_what_is_asked_or_what_came_before_a_close() -> None:
    left, right = socket.socketpair()
    try:
        recv = _reader(_Wrapper(left))

        def send_in_pieces() -> None:
            for piece in (b"abc", b"defg", b"hij" * 100_000):
                right.sendall(piece)

        writer = threading.Thread(target=send_in_pieces)
        writer.start()
        assert recv(7) == bytearray(b"abcdefg")
        assert recv(300_000) == bytearray(b"hij" * 100_000)
        writer.join()
        right.sendall(b"xyz")
        right.close()  # the peer goes away 3 bytes into a 10-byte read
        partial = recv(10)
        assert partial == bytearray(b"xyz") and isinstance(partial, bytearray)
    finally:
        left.close()


@pytest.mark.parametrize(("sop_class", "instance", "syntax"), [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1"),  # even-length UIDs
    ("1.2.840.10008.5.1.4.1.1.1.1", "2.25.123456789012345678901", "1.2.840.10008.1.2"),
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.826.0.1.3680043.8.498.1", "1.2.840.10008.1.2.4.90"),
])
def test_file_meta_is_what_pynetdicom_writes(sop_class: str, instance: str,
                                             syntax: str) -> None:
    expected = encode_file_meta(create_file_meta(
        sop_class_uid=sop_class, sop_instance_uid=instance, transfer_syntax=syntax))
    assert file_meta(sop_class, instance, syntax) == expected
