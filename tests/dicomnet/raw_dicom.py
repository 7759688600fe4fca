"""A DICOM peer on a bare socket, for what pynetdicom's requestor will not do: send on a
presentation context it was not given, go silent, stop in the middle of a PDU.

The PDUs are packed here by hand (PS3.8 9.3) and the command sets encoded with pydicom
(implicit VR little endian, PS3.7 6.3.1), so these tests depend on pynetdicom only as
the node under test.
"""

from __future__ import annotations

import socket
import struct
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.3811.23"  # any UID: ours, for this test peer

A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RP, A_ABORT = 0x02, 0x03, 0x04, 0x06, 0x07


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBI", kind, 0, len(body)) + body


class RawPeer:
    """One TCP connection to the node, driven PDU by PDU."""

    def __init__(self, port: int, timeout: float = 30) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.accepted: dict[int, bool] = {}

    def close(self) -> None:
        self.sock.close()

    def associate(self, calling: str, called: str,
                  contexts: list[tuple[int, str]]) -> tuple[int, bytes]:
        """Send an A-ASSOCIATE-RQ proposing ``(context id, abstract syntax)`` pairs, each
        in explicit VR little endian only; return the answer's (PDU type, body). On an
        A-ASSOCIATE-AC, :attr:`accepted` maps each context id to its acceptance."""
        items = _item(0x10, _uid(APPLICATION_CONTEXT))
        for context_id, abstract in contexts:
            body = struct.pack(">BBBB", context_id, 0, 0, 0) + _item(0x30, _uid(abstract))
            items += _item(0x20, body + _item(0x40, _uid(ExplicitVRLittleEndian)))
        items += _item(0x50, _item(0x51, struct.pack(">I", 16384))
                       + _item(0x52, _uid(IMPLEMENTATION_UID)))
        header = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
        self.sock.sendall(_pdu(0x01, header + b"\0" * 32 + items))
        kind, body = self.read_pdu()
        if kind == A_ASSOCIATE_AC:
            at = 68
            while at < len(body):
                item_type, _, length = struct.unpack_from(">BBH", body, at)
                if item_type == 0x21:
                    self.accepted[body[at + 4]] = body[at + 6] == 0
                at += 4 + length
        return kind, body

    def read_pdu(self) -> tuple[int, bytes]:
        """The next PDU's (type, body); (0, b"") when the node closed the connection."""
        header = self._read(6)
        if len(header) < 6:
            return 0, b""
        kind, _, length = struct.unpack(">BBI", header)
        return kind, self._read(length)

    def _read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def send_pdv(self, context_id: int, data: bytes, *, command: bool, last: bool = True) -> None:
        """One P-DATA-TF PDU holding one presentation data value."""
        control = (1 if command else 0) | (2 if last else 0)
        pdv = struct.pack(">IBB", len(data) + 2, context_id, control) + data
        self.sock.sendall(_pdu(P_DATA_TF, pdv))

    def c_store(self, context_id: int, sop_class: str, sop_instance: str, dataset: Dataset,
                message_id: int = 1) -> None:
        """A C-STORE-RQ on ``context_id`` naming ``sop_class``, then ``dataset`` (explicit
        VR little endian) on the same context."""
        command = Dataset()
        command.AffectedSOPClassUID = sop_class
        command.CommandField = 0x0001
        command.MessageID = message_id
        command.Priority = 0
        command.CommandDataSetType = 0x0000
        command.AffectedSOPInstanceUID = sop_instance
        self.send_pdv(context_id, encode_command(command), command=True)
        data = DicomBytesIO()
        data.is_little_endian, data.is_implicit_VR = True, False
        write_dataset(data, dataset)
        self.send_pdv(context_id, data.getvalue(), command=False)

    def response(self) -> tuple[int, Dataset | None]:
        """The next DIMSE response's (context id, command set), or (PDU type, None) when
        the node sent anything else (an A-ABORT: 7) or closed the connection (0)."""
        fragments = b""
        while True:
            kind, body = self.read_pdu()
            if kind != P_DATA_TF:
                return kind, None
            at = 0
            while at < len(body):
                length, context_id, control = struct.unpack_from(">IBB", body, at)
                fragments += body[at + 6:at + 4 + length]
                at += 4 + length
                if control & 1 and control & 2:
                    return context_id, read_dataset(BytesIO(fragments), True, True)

    def release(self) -> int:
        """A-RELEASE-RQ; the type of the PDU the node answers with."""
        self.sock.sendall(_pdu(0x05, b"\0" * 4))
        kind, _ = self.read_pdu()
        self.close()
        return kind


def encode_command(command: Dataset) -> bytes:
    """A command set in implicit VR little endian with its (0000,0000) group length."""
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, True
    write_dataset(body, command)
    data = body.getvalue()
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(data)) + data
