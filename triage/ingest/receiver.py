"""The DICOM node: a C-ECHO and C-STORE receiver (SCP) in front of :class:`ReceivedStore`.

One pynetdicom server thread accepts connections; each association runs on its own
thread. An association is refused with an A-ASSOCIATE-RJ when the peer's address is not
in ``dicom.allowed_hosts`` (permanent, no reason given), its called AE title is not
``dicom.ae_title`` (called AE title not recognised) or its calling AE title is not in
``dicom.allowed_calling_ae_titles`` (calling AE title not recognised); empty lists admit
any. Exactly ``dicom.max_associations`` are admitted at once, first come first served: an
association holds its slot from its A-ASSOCIATE-RQ until its connection closes, and one
more is refused as transient (local limit exceeded): the sender retries later. (The
receiver counts the slots itself; pynetdicom's own limit counts threads, see
:meth:`DicomReceiver._admit`.)

An association with no PDU from its peer for ``dicom.idle_timeout_seconds``, while no
request of its is being answered, is aborted (A-ABORT) and its slot freed: a sender that
died mid-association, or keeps an association open without using it, does not hold a
slot until the network timeout. (See :meth:`DicomReceiver._check_idle`.)

Every storage SOP class is accepted, in the transfer syntaxes pydicom and pylibjpeg can
decode (uncompressed little and big endian, deflated, JPEG baseline, extended and
lossless, JPEG-LS, JPEG 2000 and HTJ2K, RLE). A C-STORE is answered Success (0x0000)
only after the instance passed :func:`~triage.ingest.dicom.check_received` (what its
bytes show without decoding: a header that parses, the four required UIDs, pixel data
that can hold the image declared) and :meth:`ReceivedStore.accept` made it durable and
journaled it. An instance that fails the check is neither stored nor journaled: 0xC000
(Cannot Understand) when it does not parse, 0xA900 (Data Set Does Not Match SOP Class)
when a required UID is missing, the data set's SOP Class or Instance UID is not the
request's, or its pixel data is short or its items malformed. A store refused for lack of
space or a busy database answers 0xA700 (Refused: Out of Resources, the sender retries),
any other failure 0xC000. Each carries the reason in the Error Comment (the reader's
words, never a value from the data set). A C-STORE whose Affected SOP Class is not the
abstract syntax of the presentation context it came on is answered 0x0122 (Refused: SOP
Class Not Supported) before its data set is looked at; one on a presentation context the
association did not accept is aborted (see :func:`_check_context`). What the ingest loop
later cannot read (a codestream a decoder fails on) is quarantined or archived
``unsupported`` with its reason, like an inbox file.

When an association ends (released, aborted, or its connection lost) the ids of the
files it stored are handed once to ``on_association_end``: the daemon completes their
studies at once instead of waiting for ``studies.stable_age_seconds``.

Latency: Nagle's algorithm is switched off (TCP_NODELAY) on every accepted socket, so a
C-STORE response leaves at once instead of waiting for the peer's delayed ACK (~40 ms
per instance). Senders should disable it too: DCMTK tools (storescu, dcmsend, ...) read
the environment variable ``TCP_NODELAY`` (1 disables Nagle; Debian's DCMTK 3.6.7 keeps
Nagle on when it is unset, as its trace log says: run them with ``TCP_NODELAY=1``);
other senders need the socket option set on their side.

Logs carry the calling AE title and peer address, never dataset content. pynetdicom's
own logger is held at WARNING and bridged into triage's events without exception text
or UIDs (at DEBUG it would print whole datasets).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from triage.errors import ConfigError, DicomRejected, TriageError
from triage.ingest.dicom import (
    CANNOT_UNDERSTAND,
    DOES_NOT_MATCH_SOP_CLASS,
    InstanceRefused,
    ReceivedHeader,
    check_received,
)
from triage.ingest.received import ReceivedStore, StoreFailed
from triage.ingest.settings import DicomSettings
from triage.telemetry.logs import event
from triage.telemetry.metrics import Metrics

log = logging.getLogger("triage.dicomnet")

STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122  # PS3.7 Annex C: Refused: SOP Class Not Supported
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DOES_NOT_MATCH = DOES_NOT_MATCH_SOP_CLASS
STATUS_CANNOT_UNDERSTAND = CANNOT_UNDERSTAND
_COMMENT_CHARS = 64  # Error Comment is an LO

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
_REJECT_HOST = (0x01, 0x01, 0x01)  # rejected permanent, service user, no reason given
_REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # called AE title not recognised
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # calling AE title not recognised
_REJECT_BUSY = (0x02, 0x03, 0x02)  # rejected transient, presentation, local limit exceeded
_REJECT_RESULTS = {_REJECT_BUSY: "rejected_busy", _REJECT_CALLED_AE: "rejected_called_ae",
                   _REJECT_CALLING_AE: "rejected_calling_ae", _REJECT_HOST: "rejected_host"}

_CANDIDATE_SYNTAXES = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
    JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, HTJ2KLossless,
    HTJ2KLosslessRPCL, HTJ2K, RLELossless,
)
# After the last C-STORE handler returned, the time its association thread gets to queue
# the response before stop() aborts the associations.
_ANSWER_GRACE_SECONDS = 0.2
# pynetdicom refuses an association when more than `ae.maximum_associations` of its
# acceptor threads are alive; the receiver admits by its own count (see _admit), so that
# check is set out of reach.
_PYNETDICOM_NO_LIMIT = 2**31 - 1
# After an idle association's A-ABORT was queued, how long it may take to be sent before
# the association's threads are ended anyway, and its connection shut if still open (a
# DUL thread blocked in the middle of a PDU the peer never ends sends nothing).
_IDLE_CLOSE_GRACE_SECONDS = 1.0
# pynetdicom's DUL thread polls its socket and its queues, sleeping `_run_loop_delay`
# between empty polls (1 ms, pynetdicom 3.0): each C-STORE waits up to that long to be
# read and again for its answer to be sent. While an association is busy its DUL polls
# every 0.1 ms; one quiet for _SLOW_POLL_AFTER_SECONDS goes back to pynetdicom's 1 ms (a
# busy-polling DUL costs about 15 % of a core). See _tune_association.
_BUSY_POLL_SECONDS = 0.0001
_QUIET_POLL_SECONDS = 0.001
_SLOW_POLL_AFTER_SECONDS = 1.0
_UID_RE = re.compile(r"\b\d+(?:\.\d+){3,}\b")


def transfer_syntaxes() -> list[UID]:
    """The transfer syntaxes offered for storage: those pydicom can decode here."""
    usable = []
    for uid in _CANDIDATE_SYNTAXES:
        try:
            if get_decoder(uid).is_available:
                usable.append(uid)
        except NotImplementedError:
            continue
    return usable


class _PynetdicomBridge(logging.Handler):
    """pynetdicom's warnings and errors as triage events: the message with UIDs masked,
    no exception text (it can quote dataset values), only the exception type."""

    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, object] = {"source": record.name}
        if record.exc_info and record.exc_info[0] is not None:
            fields["error_type"] = record.exc_info[0].__name__
            detail = "exception"
        else:
            try:
                detail = _UID_RE.sub("<uid>", record.getMessage())[:200]
            except Exception:  # noqa: BLE001 - a bad format string
                detail = "unformattable message"
        event(log, "pynetdicom_log", record.levelno, detail=detail, **fields)


def quiet_pynetdicom() -> None:
    """Hold pynetdicom's logger at WARNING and route it through triage's events only."""
    logger = logging.getLogger("pynetdicom")
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    if not any(isinstance(h, _PynetdicomBridge) for h in logger.handlers):
        logger.addHandler(_PynetdicomBridge())


@dataclass
class _Closing:
    """An idle association being aborted."""

    deadline: float  # time.monotonic() after which its connection is shut if still open
    handle: socket.socket | None  # the receiver's own handle on its socket
    sent: threading.Event = field(default_factory=threading.Event)  # its A-ABORT went out


@dataclass
class _Association:
    calling_ae: str
    peer: str
    opened: float = field(default_factory=time.monotonic)
    file_ids: list[int] = field(default_factory=list)
    stored: int = 0
    failed: int = 0
    # time.monotonic() of the last PDU received or sent, or of the last answer
    last_activity: float = field(default_factory=time.monotonic)
    answering: int = 0  # requests of this association being answered now
    idle_aborted: bool = False


def _peer_allowed(address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
                  ) -> bool:
    if not networks:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


class DicomReceiver:
    """The DICOM SCP; :meth:`start` binds and serves on threads, :meth:`stop` ends it.

    Args:
        settings: The ``dicom:`` section (port, host, AE titles, limits, timeouts).
        store: Makes each instance durable before it is acknowledged.
        on_association_end: Called once per accepted association when it ends (released,
            aborted, connection lost), with the ``files`` ids it stored (maybe none).
        metrics: The daemon's metrics (``dicom_*``).
    """

    def __init__(
        self,
        settings: DicomSettings,
        store: ReceivedStore,
        on_association_end: Callable[[list[int]], None],
        metrics: Metrics,
    ) -> None:
        if settings.port is None:
            raise ConfigError("dicom.port is not set: the DICOM receiver is off")
        self._settings = settings
        self._store = store
        self._on_end = on_association_end
        self._metrics = metrics
        self._networks = [ipaddress.ip_network(h, strict=False) for h in settings.allowed_hosts]
        self._calling = {title.strip() for title in settings.allowed_calling_ae_titles}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._open: dict[Association, _Association] = {}
        # Admitted associations (from the A-ASSOCIATE-RQ) whose connection is still open.
        self._slots: set[Association] = set()
        # Idle associations being aborted, until their connection closes.
        self._closing: dict[Association, _Closing] = {}
        self._in_flight = 0
        self._stopping = False
        self._server: ThreadedAssociationServer | None = None
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._ae = self._make_ae()
        quiet_pynetdicom()

    def _make_ae(self) -> AE:
        s = self._settings
        ae = AE(ae_title=s.ae_title)
        syntaxes = transfer_syntaxes()
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                                ExplicitVRBigEndian])
        # The handlers below refuse first, with the reason counted; these are a backstop.
        ae.require_called_aet = True
        ae.require_calling_aet = sorted(self._calling)
        ae.maximum_associations = _PYNETDICOM_NO_LIMIT  # the receiver admits: see _admit
        ae.maximum_pdu_size = s.max_pdu_bytes
        ae.acse_timeout = s.acse_timeout_seconds
        ae.dimse_timeout = s.dimse_timeout_seconds
        ae.network_timeout = s.network_timeout_seconds
        return ae

    last_store_at: float = 0.0
    """time.monotonic() of the last C-STORE answered while an association is open; 0 when
    none is (the ingest loop defers reading while a sender is sending, see daemon.py)."""

    @property
    def port(self) -> int | None:
        """The port bound by :meth:`start` (None before it and after :meth:`stop`)."""
        if self._server is None:
            return None
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind ``dicom.host``:``dicom.port`` and serve on background threads.

        Raises:
            TriageError: the port is in use or not ours to bind (one line, exit status 1).
            ConfigError: the host is not an address of this machine.
        """
        s = self._settings
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_PDU_RECV, self._on_pdu),
            (evt.EVT_PDU_SENT, self._on_pdu_sent),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        where = f"dicom.host {s.host!r}, dicom.port {s.port}"
        try:
            server = self._ae.start_server((s.host, s.port), block=False, evt_handlers=handlers)
        except socket.gaierror:
            raise ConfigError(f"{where}: the host name cannot be resolved") from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise TriageError(f"{where}: address already in use") from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise TriageError(f"{where}: permission denied (ports below 1024 need "
                                  "privileges)") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"{where}: not an address of this machine") from None
            raise TriageError(f"{where}: cannot listen ({exc.strerror or exc})") from None
        self._server = server
        self._watch_stop.clear()
        self._watcher = threading.Thread(target=self._watch, name="triage-dicom-idle",
                                         daemon=True)
        self._watcher.start()
        event(log, "dicom_receiver_started", host=s.host, port=self.port, ae_title=s.ae_title,
              max_associations=s.max_associations, idle_timeout=s.idle_timeout_seconds)

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, let C-STOREs in flight answer, then abort what is still open.

        C-STOREs that arrive from here on answer 0xA700 (the sender retries later).
        ``timeout`` bounds the wait for those in flight (default: the store timeout + 5 s).
        """
        if self._server is None:
            return
        with self._lock:
            self._stopping = True
        server, self._server = self._server, None
        server.shutdown()  # no new connections; the listening socket is closed
        deadline = time.monotonic() + (
            self._settings.store_timeout_seconds + 5 if timeout is None else timeout)
        with self._idle:
            while self._in_flight and time.monotonic() < deadline:
                self._idle.wait(max(0.0, deadline - time.monotonic()))
            waited_out = self._in_flight
        if self._open:
            time.sleep(_ANSWER_GRACE_SECONDS)  # let the last answers be queued before A-ABORT
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
            self._watcher = None
        with self._lock:
            closing, self._closing = list(self._closing.values()), {}
        for entry in closing:
            _shut(entry.handle)
        self._ae.shutdown()  # aborts the associations still open: each ends as `aborted`
        event(log, "dicom_receiver_stopped", unanswered=waited_out)

    # ---- association life cycle ---------------------------------------------------

    def _on_conn_open(self, event_: evt.Event) -> None:
        sock = event_.assoc.dul.socket
        raw = getattr(sock, "socket", None)
        if raw is not None:
            try:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # not TCP (never here), or already closed
        _tune_association(event_.assoc)

    def _on_requested(self, event_: evt.Event) -> None:
        """A-ASSOCIATE-RQ received: refuse unknown hosts and AE titles (A-ASSOCIATE-RJ)."""
        assoc = event_.assoc
        request = assoc.requestor.primitive
        calling = str(request.calling_ae_title or "").strip()
        called = str(request.called_ae_title or "").strip()
        peer = self._peer(assoc)
        if not _peer_allowed(peer, self._networks):
            reason = _REJECT_HOST
        elif called != self._settings.ae_title:
            reason = _REJECT_CALLED_AE
        elif self._calling and calling not in self._calling:
            reason = _REJECT_CALLING_AE
        elif not self._admit(assoc):
            reason = _REJECT_BUSY
        else:
            return
        result = _REJECT_RESULTS[reason]
        self._metrics.dicom_associations.labels(result=result).inc()
        fields = {"max_associations": self._settings.max_associations} if (
            reason == _REJECT_BUSY) else {}
        event(log, "dicom_association_rejected", logging.WARNING, result=result,
              calling_ae=calling, called_ae=called, peer=peer, **fields)
        assoc.acse.send_reject(*reason)
        # As pynetdicom does for its own rejections: wait for the DUL to send the
        # A-ASSOCIATE-RJ and the peer to close (or the ARTIM timer) before the socket goes.
        assoc.kill()

    def _admit(self, assoc: Association) -> bool:
        """Take one of the ``dicom.max_associations`` slots for ``assoc`` if one is free.

        The slot is held until the association's connection closes (EVT_CONN_CLOSE, or
        :meth:`_check_idle` finding its thread gone), so exactly the limit is admitted,
        first come first served, and a burst beyond it is refused as busy.

        Why not pynetdicom's ``maximum_associations``: its acceptor (``ACSE.
        _negotiate_as_acceptor``, pynetdicom 3.0) refuses when more than that many of the
        AE's acceptor *threads* are alive, and a thread is alive from the moment its
        connection is accepted until it is torn down: requests still being read, others
        being refused, associations whose connection is closing. Under a burst it refuses
        associations that would fit (13 to 15 of 16 admitted, 2026-12). This handler
        runs on EVT_REQUESTED, pynetdicom's documented hook for an A-ASSOCIATE-RQ before
        negotiation, which refuses with ``send_reject`` as the AE title checks above do;
        pynetdicom's count is set out of reach (``_PYNETDICOM_NO_LIMIT``) rather than
        replaced (an AE subclass overriding ``active_associations`` would also change what
        ``AE.shutdown`` aborts and which threads timeout changes reach). Pinned by
        tests/dicomnet/test_receiver_limits.py: a pynetdicom that stops calling this hook
        or counts differently fails it."""
        with self._lock:
            if len(self._slots) >= self._settings.max_associations:
                return False
            self._slots.add(assoc)
            return True

    def _on_rejected(self, event_: evt.Event) -> None:
        """Rejected by pynetdicom itself during negotiation (a backstop: the handlers
        refuse first)."""
        primitive = event_.assoc.acceptor.primitive
        key = (primitive.result, primitive.result_source, primitive.diagnostic)
        result = _REJECT_RESULTS.get(key, "rejected_busy")
        self._metrics.dicom_associations.labels(result=result).inc()
        request = event_.assoc.requestor.primitive
        event(log, "dicom_association_rejected", logging.WARNING, result=result,
              calling_ae=str(request.calling_ae_title or "").strip(),
              peer=self._peer(event_.assoc), max_associations=self._settings.max_associations)

    def _on_established(self, event_: evt.Event) -> None:
        assoc = event_.assoc
        record = _Association(calling_ae=assoc.requestor.ae_title.strip(),
                              peer=self._peer(assoc))
        with self._lock:
            self._open[assoc] = record
        self._metrics.dicom_associations.labels(result="accepted").inc()
        self._metrics.dicom_active_associations.inc()
        event(log, "dicom_association_accepted", calling_ae=record.calling_ae,
              peer=record.peer, contexts=len(assoc.accepted_contexts))

    def _on_released(self, event_: evt.Event) -> None:
        self._end(event_.assoc, "released")

    def _on_aborted(self, event_: evt.Event) -> None:
        self._end(event_.assoc, "aborted")

    def _on_conn_close(self, event_: evt.Event) -> None:
        """The connection closed. Normally the association already ended (released or
        aborted); if not, it ends as aborted once its thread is done (watched from another
        thread: this one is the association's DUL, which its thread waits for)."""
        assoc = event_.assoc
        with self._lock:
            self._slots.discard(assoc)  # the connection is gone: its slot is free
            entry = self._closing.pop(assoc, None)
            known = assoc in self._open
        if entry is not None:
            _shut(entry.handle)
        if not known:
            return

        def reap() -> None:
            assoc.join(timeout=self._settings.store_timeout_seconds + 5)
            self._end(assoc, "aborted")

        threading.Thread(target=reap, name="triage-dicom-reap", daemon=True).start()

    def _end(self, assoc: Association, result: str) -> None:
        """Exactly once per accepted association: count it and hand its files over."""
        with self._lock:
            record = self._open.pop(assoc, None)
            if not self._open:
                self.last_store_at = 0.0  # no sender waits: what arrived is read at once
        if record is None:
            return
        self._metrics.dicom_associations.labels(result=result).inc()
        self._metrics.dicom_active_associations.dec()
        event(log, f"dicom_association_{result}", calling_ae=record.calling_ae,
              peer=record.peer, stored=record.stored, failed=record.failed,
              seconds=round(time.monotonic() - record.opened, 3))
        self._hand_over(record.file_ids)

    def _hand_over(self, file_ids: list[int]) -> None:
        try:
            self._on_end(list(file_ids))
        except Exception as exc:  # noqa: BLE001 - the stable age completes them instead
            event(log, "dicom_association_end_error", logging.ERROR,
                  error_type=type(exc).__name__)

    def _on_pdu(self, event_: evt.Event) -> None:
        """A PDU received or sent (the DUL's thread): the association is not idle."""
        record = self._open.get(event_.assoc)
        if record is not None:
            record.last_activity = time.monotonic()
        event_.assoc.dul._run_loop_delay = _BUSY_POLL_SECONDS

    def _on_pdu_sent(self, event_: evt.Event) -> None:
        self._on_pdu(event_)
        if isinstance(event_.pdu, A_ABORT_RQ):
            entry = self._closing.get(event_.assoc)
            if entry is not None:
                entry.sent.set()

    # ---- idle associations -----------------------------------------------------------

    def _watch(self) -> None:
        tick = min(1.0, max(0.05, self._settings.idle_timeout_seconds / 4))
        while not self._watch_stop.wait(tick):
            try:
                self._check_idle(time.monotonic())
            except Exception as exc:  # noqa: BLE001 - the next tick tries again
                event(log, "dicom_idle_check_error", logging.ERROR,
                      error_type=type(exc).__name__)

    def _check_idle(self, now: float) -> None:
        """Abort the associations idle for ``dicom.idle_timeout_seconds``; close their
        connections if their peers have not after a grace; free what was left behind.

        Idle means: no PDU received or sent (EVT_PDU_RECV, EVT_PDU_SENT) since the last
        answer, and no request of the association being answered now (a C-STORE waiting
        for the database is the receiver's time, not the peer's). pynetdicom's
        ``network_timeout`` is not that: it counts from the last PDU *received*, the
        receiver's own time answering included, and on expiry its A-ABORT waits for the
        peer to close (up to the ACSE timeout). It stays as ``dicom.
        network_timeout_seconds``, a backstop that must be the longer of the two.

        The abort runs on a thread of its own (:func:`_abort_idle`); the association's
        thread closes the connection when it ends, which frees the slot. A peer that
        stopped in the middle of a PDU leaves the association's DUL thread blocked
        reading it, where neither the A-ABORT nor that close reach it (pynetdicom's
        sockets have no timeout): ``_IDLE_CLOSE_GRACE_SECONDS`` after the abort, the
        connection is shut through a handle on its socket taken at the abort, which
        wakes the DUL; the slot was freed when the association's thread ended."""
        limit = self._settings.idle_timeout_seconds
        with self._lock:
            idle = [(assoc, record) for assoc, record in self._open.items()
                    if not record.answering and not record.idle_aborted
                    and now - record.last_activity >= limit]
            aborting = []
            for assoc, record in idle:
                record.idle_aborted = True
                entry = _Closing(now + _IDLE_CLOSE_GRACE_SECONDS, _dup(assoc))
                self._closing[assoc] = entry
                aborting.append((assoc, record, entry))
            overdue = [self._closing.pop(assoc) for assoc, entry in
                       list(self._closing.items()) if entry.deadline <= now]
            # Belt and braces: a connection pynetdicom closed without EVT_CONN_CLOSE (its
            # DUL ended on an exception) leaves a thread that has ended.
            for assoc in [a for a in self._slots if not a.is_alive()]:
                self._slots.discard(assoc)
            ended = [assoc for assoc in self._open if not assoc.is_alive()]
            for assoc, record in self._open.items():
                if not record.answering and now - record.last_activity >= (
                        _SLOW_POLL_AFTER_SECONDS):
                    assoc.dul._run_loop_delay = _QUIET_POLL_SECONDS
        for assoc, record, entry in aborting:
            self._metrics.dicom_idle_aborts.inc()
            event(log, "dicom_association_idle_aborted", logging.WARNING,
                  calling_ae=record.calling_ae, peer=record.peer,
                  idle_seconds=round(now - record.last_activity, 1), idle_timeout=limit)
            threading.Thread(target=_abort_idle, args=(assoc, entry.sent),
                             name="triage-dicom-idle-abort", daemon=True).start()
        for entry in overdue:
            _shut(entry.handle)
        for assoc in ended:
            self._end(assoc, "aborted")

    @staticmethod
    def _peer(assoc: Association) -> str:
        try:
            return str(assoc.requestor.address)
        except ValueError:
            return ""

    # ---- DIMSE services -------------------------------------------------------------

    def _on_echo(self, event_: evt.Event) -> int:
        if not isinstance(event_.request, C_ECHO):
            # pynetdicom picks the service by the request's Affected SOP Class: a C-STORE
            # naming the Verification SOP Class lands here, and would be answered with a
            # C-ECHO response (Success, nothing stored). Abort it, as pynetdicom does a
            # C-STORE naming any other SOP class that has no storage service.
            event(log, "dicom_store_refused", logging.WARNING, status="abort",
                  reason="a C-STORE naming the Verification SOP Class",
                  reason_code="sop_class_not_storage",
                  calling_ae=str(event_.assoc.requestor.ae_title).strip(),
                  peer=self._peer(event_.assoc))
            self._metrics.dicom_instances.labels(status="failed").inc()
            event_.assoc.abort()
            return STATUS_SOP_CLASS_NOT_SUPPORTED
        self._metrics.dicom_instances.labels(status="echo").inc()
        return STATUS_SUCCESS

    def _on_store(self, event_: evt.Event) -> Dataset:
        """C-STORE: Success only once the instance is durable and journaled."""
        started = time.perf_counter()
        assoc = event_.assoc
        with self._lock:
            record = self._open.get(assoc)
            stopping = self._stopping
            if not stopping:
                self._in_flight += 1
            if record is not None:
                record.answering += 1  # not idle while it is answered
        calling = record.calling_ae if record else str(assoc.requestor.ae_title).strip()
        code: str | None = None
        try:
            if stopping:
                status, label, reason = (STATUS_OUT_OF_RESOURCES, "out_of_resources",
                                         "the receiver is shutting down")
            elif (mismatch := _check_context(event_)) is not None:
                if record is not None:
                    record.failed += 1
                status, label, reason, code = (STATUS_SOP_CLASS_NOT_SUPPORTED, "failed",
                                               mismatch, "sop_class_not_negotiated")
            else:
                status, label, reason, code = self._store_one(event_, record, calling)
        finally:
            with self._idle:
                if not stopping:
                    self._in_flight -= 1
                    self._idle.notify_all()
                if record is not None:
                    record.answering -= 1
                    record.last_activity = time.monotonic()
        seconds = time.perf_counter() - started
        self.last_store_at = time.monotonic()
        self._metrics.dicom_store_seconds.observe(seconds)
        self._metrics.dicom_instances.labels(status=label).inc()
        answer = Dataset()
        answer.Status = status
        if status != STATUS_SUCCESS:
            answer.ErrorComment = error_comment(reason)
            fields = {"reason_code": code} if code else {}
            event(log, "dicom_store_refused", logging.WARNING, status=f"0x{status:04X}",
                  reason=reason, calling_ae=calling, peer=self._peer(assoc),
                  seconds=round(seconds, 4), **fields)
        return answer

    def _store_one(self, event_: evt.Event, record: _Association | None,
                   calling: str) -> tuple[int, str, str, str | None]:
        """(status, ``dicom_instances`` label, reason in words, refusal reason code)."""
        try:
            data = part10(event_)

            def check(data: bytes) -> None:
                _check_request(check_received(data), event_)

            file_id = self._store.accept(data, origin="dicom", sender=calling or None,
                                         check=check)
        except InstanceRefused as exc:
            if record is not None:
                record.failed += 1
            self._metrics.received_invalid.labels(origin="dicom", reason=exc.code).inc()
            return exc.status, "failed", exc.reason, exc.code
        except StoreFailed as exc:
            if record is not None:
                record.failed += 1
            if exc.out_of_resources:
                return STATUS_OUT_OF_RESOURCES, "out_of_resources", exc.reason, None
            return STATUS_CANNOT_UNDERSTAND, "failed", exc.reason, None
        except Exception as exc:  # noqa: BLE001 - never Success, never a traceback
            if record is not None:
                record.failed += 1
            return (STATUS_CANNOT_UNDERSTAND, "failed",
                    f"the instance could not be stored ({type(exc).__name__})", None)
        late = False
        with self._lock:
            if record is not None and event_.assoc in self._open:
                record.file_ids.append(file_id)
                record.stored += 1
            else:
                late = True  # its association already ended: hand it over alone
        if late:
            self._hand_over([file_id])
        return STATUS_SUCCESS, "success", "", None


def _tune_association(assoc: Association) -> None:
    """Make a new association's reading cheaper: its DUL polls every
    ``_BUSY_POLL_SECONDS`` (until :meth:`DicomReceiver._check_idle` finds it quiet), and
    its socket reads a PDU with ``recv_into`` into one buffer of the PDU's length instead
    of pynetdicom's 4 KiB ``recv`` calls appended one by one (128 of them for a 512 KiB
    PDU). Measured with DCMTK's storescu sending 500 CT of 512x512 (2026-12-05, 2 cores):
    pynetdicom answering Success without storing anything went from 257-276 instances/s
    to 310-345 with the faster poll and 333-392 with both.

    Both reach into pynetdicom 3.0: ``DULServiceProvider._run_loop_delay`` (the knob its
    reactor documents for trading idle CPU against latency) and the instance's
    ``AssociationSocket.recv`` (same contract: block until ``nr_bytes`` are read, return
    what was read if the peer closes). tests/dicomnet/test_receiver_tuning.py pins both,
    so an upgrade that moves them fails there, not silently here."""
    assoc.dul._run_loop_delay = _BUSY_POLL_SECONDS
    wrapper = assoc.dul.socket
    if wrapper is not None:
        wrapper.recv = _reader(wrapper)


def _reader(wrapper: object) -> Callable[[int], bytearray]:
    """``AssociationSocket.recv`` for ``wrapper``, reading into one buffer."""

    def recv(nr_bytes: int) -> bytearray:
        raw = wrapper.socket  # type: ignore[attr-defined]  # read at each call, as pynetdicom does
        buffer = bytearray(nr_bytes)
        read = 0
        with memoryview(buffer) as view:
            while read < nr_bytes:
                count = raw.recv_into(view[read:])
                if not count:  # the peer closed: what was read so far
                    break
                read += count
        if read < nr_bytes:
            del buffer[read:]
        return buffer

    return recv


def part10(event_: evt.Event) -> bytes:
    """The C-STORE's data set as a DICOM file: what ``event_.encoded_dataset()`` returns,
    byte for byte, without building and encoding a pydicom ``FileMetaDataset`` for each
    instance (0.38 ms of the interpreter's time of about 4 per 512x512 CT; the preamble
    and the seven group 0002 elements are written here, see :func:`file_meta`)."""
    request = event_.request
    return b"".join((
        b"\x00" * 128, b"DICM",
        file_meta(str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                  str(event_.context.transfer_syntax)),
        event_.encoded_dataset(include_meta=False),
    ))


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """The File Meta Information pynetdicom writes for a received instance (PS3.10 7.1:
    explicit VR little endian; the implementation UID and version are pynetdicom's).
    tests/dicomnet/test_receiver_tuning.py compares it with pynetdicom's own encoding."""
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _ui(sop_class_uid)),
        _meta_element(0x0003, b"UI", _ui(sop_instance_uid)),
        _meta_element(0x0010, b"UI", _ui(transfer_syntax)),
        _META_IMPLEMENTATION,
    ))
    return _meta_element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _ui(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\x00" if len(value) % 2 else value


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":  # a 4-byte length after two reserved bytes
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _sh(text: str) -> bytes:
    value = text.encode("ascii")
    return value + b" " if len(value) % 2 else value


_META_IMPLEMENTATION = (
    _meta_element(0x0012, b"UI", _ui(PYNETDICOM_IMPLEMENTATION_UID))
    + _meta_element(0x0013, b"SH", _sh(PYNETDICOM_IMPLEMENTATION_VERSION)))


def _abort_idle(assoc: Association, sent: threading.Event) -> None:
    """A-ABORT ``assoc``, then end its threads once the A-ABORT is out (or after the grace).

    Not ``Association.abort()`` as it blocks by default (what ``AE.shutdown`` uses): it
    queues the A-ABORT for the DUL thread and at once has the association's thread end,
    which closes the connection, so the A-ABORT is sent or not depending on which thread
    runs first (seen here under load: the peer got only the close). ``abort(block=False)``
    queues it and returns; ``kill()`` ends the threads after EVT_PDU_SENT showed it sent.
    """
    assoc.abort(block=False)
    sent.wait(_IDLE_CLOSE_GRACE_SECONDS)
    assoc.kill()


def _dup(assoc: Association) -> socket.socket | None:
    """A handle of the receiver's own on the association's socket, or None."""
    raw = getattr(assoc.dul.socket, "socket", None)
    try:
        return raw.dup() if raw is not None else None
    except OSError:
        return None  # closed meanwhile


def _shut(handle: socket.socket | None) -> None:
    """Shut the connection under ``handle`` (waking a thread blocked reading it), close
    the handle."""
    if handle is None:
        return
    try:
        handle.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # the connection is already gone
    handle.close()


def _check_context(event_: evt.Event) -> str | None:
    """Why a C-STORE may not be stored on the presentation context it came on, or None.

    PS3.8 (7.1.1.13): a presentation context is negotiated for one abstract syntax, here
    one storage SOP class; a C-STORE whose Affected SOP Class is another one (a storage
    class the association may not even have proposed) was not negotiated. It is answered
    0x0122 Refused: SOP Class Not Supported, on the context it came on, before its data
    set is read; the association goes on.

    What pynetdicom does not let reach this handler (Association._serve_request, 3.0):
    a request on a presentation context ID the association did not accept is A-ABORTed
    before any handler: there is no negotiated transfer syntax to read it with and no
    accepted context to answer on (DCMTK's DIMSE layer refuses such a message too). A
    C-STORE naming a SOP class with no storage service (a query/retrieve model, an
    unknown UID) is dispatched by that UID, finds no service and is aborted as well; one
    naming the Verification SOP Class reaches :meth:`DicomReceiver._on_echo`, which
    aborts it.
    """
    named = str(getattr(event_.request, "AffectedSOPClassUID", "") or "").strip()
    if named != str(event_.context.abstract_syntax).strip():
        return "the request's SOP Class UID is not its presentation context's"
    return None


def _check_request(header: ReceivedHeader, event_: evt.Event) -> None:
    """The data set must be the instance the C-STORE request names: the sender keeps its
    record of what was stored by the request's UIDs, the archive by the data set's."""
    request = event_.request
    for keyword, ours, name in (
        ("AffectedSOPClassUID", header.sop_class_uid, "SOP Class UID"),
        ("AffectedSOPInstanceUID", header.sop_instance_uid, "SOP Instance UID"),
    ):
        named = str(getattr(request, keyword, "") or "").strip()
        if named and ours != named:
            raise InstanceRefused(
                DicomRejected("sop_mismatch",
                              f"the data set's {name} is not the one the request names"),
                STATUS_DOES_NOT_MATCH, header)


def error_comment(reason: str) -> str:
    """``reason`` as an Error Comment (LO, at most 64 characters), cut at a word."""
    if len(reason) <= _COMMENT_CHARS:
        return reason
    cut = reason[:_COMMENT_CHARS - 3].rsplit(" ", 1)[0].rstrip(",;:")
    return cut + "..."
