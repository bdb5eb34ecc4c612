"""The host side of the profiling protocol (firmware: firmware_templates/common/profile_main.c).

Frame, both directions: 0xA5, type, seq, length (u16 LE), payload, CRC-16/CCITT-FALSE (u16 LE)
over type..payload. Responses carry the request's type | 0x80 and its seq; 0xFF is an error
(u8 code, text). The reader hunts for the start byte, so garbage on the line is skipped, and a
frame with a bad CRC is dropped byte by byte until a good one parses; so is a header whose
(bogus) length would swallow a good frame that follows it. Every request is retried on
a timeout, a CRC error or a NAK, up to a budget; the firmware answers a repeated request from its
cache, so a retry never runs the model twice. After the budget: ProtocolError, never a hang.
"""

import binascii
import struct
import time

from .errors import EdgepruneError

START = 0xA5
VERSION = 1
MAGIC = b"EPPF"
MAX_PAYLOAD = 512
HEADER = 5  # start, type, seq, length
FILL = HEADER + MAX_PAYLOAD + 2
POLL = 0.05  # s per read while waiting

HELLO, LAYER_NAME, UPLOAD, RUN, READ_OUTPUT, READ_LAYERS, STACK, BYE = range(1, 9)
BOOT, ERROR = 0x7E, 0xFF
ERRORS = {1: "bad crc", 2: "frame too long", 3: "unknown command", 4: "bad arguments"}


class ProtocolError(EdgepruneError):
    """The device did not answer correctly within the timeout and retry budget."""


class DeviceReset(ProtocolError):
    """The device booted again in the middle of a session."""


def crc16(data: bytes) -> int:
    return binascii.crc_hqx(data, 0xFFFF)  # CRC-16/CCITT-FALSE


def encode(type_: int, seq: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} B exceeds {MAX_PAYLOAD} B")
    body = struct.pack("<BBH", type_, seq, len(payload)) + payload
    return bytes([START]) + body + struct.pack("<H", crc16(body))


class FrameReader:
    """Parses frames out of a byte stream, skipping garbage and frames with a bad CRC."""

    def __init__(self):
        self.buf = bytearray()
        self.dropped = 0  # bytes skipped while resynchronising (reported, useful for link health)

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next_frame(self):
        """(type, seq, payload) of the next good frame in the buffer, or None if none is complete."""
        while True:
            i = self.buf.find(START)
            if i < 0:
                self.dropped += len(self.buf)
                self.buf.clear()
                return None
            if i:
                self.dropped += i
                del self.buf[:i]
            if len(self.buf) < HEADER:
                return None
            type_, seq, n = struct.unpack_from("<BBH", self.buf, 1)
            if n > MAX_PAYLOAD:
                self._skip_start()
                continue
            if len(self.buf) < HEADER + n + 2:
                return self._frame_behind_incomplete()
            body = bytes(self.buf[1:HEADER + n])
            (crc,) = struct.unpack_from("<H", self.buf, HEADER + n)
            if crc != crc16(body):
                self._skip_start()
                continue
            del self.buf[:HEADER + n + 2]
            return type_, seq, body[4:]

    def _frame_behind_incomplete(self):
        """A good frame complete behind an incomplete one means the first header was garbage
        (a bogus length would otherwise stall the reader until the line brings that many bytes)."""
        j = self.buf.find(START, 1)
        while j > 0:
            if len(self.buf) - j >= HEADER + 2:
                n = struct.unpack_from("<H", self.buf, j + 3)[0]
                end = j + HEADER + n + 2
                if n <= MAX_PAYLOAD and end <= len(self.buf) and \
                        struct.unpack_from("<H", self.buf, end - 2)[0] == crc16(bytes(self.buf[j + 1:end - 2])):
                    self.dropped += j
                    del self.buf[:j]
                    return self.next_frame()
            j = self.buf.find(START, j + 1)
        return None

    def _skip_start(self):
        self.dropped += 1
        del self.buf[:1]


class Link:
    """Request/response over a pyserial port (a tty, socket://, or QEMU's TCP UART)."""

    def __init__(self, port, timeout: float = 2.0, retries: int = 5, what: str = "the device"):
        self.port, self.timeout, self.retries, self.what = port, timeout, retries, what
        self.reader = FrameReader()
        self.seq = int(time.time() * 1000) & 0xFF  # a fresh session does not reuse the last seq
        self.retried = 0
        self.booted_once = False

    def request(self, type_: int, payload: bytes = b"", timeout: float | None = None) -> bytes:
        """Send one request and return the payload of its response; retries, then ProtocolError."""
        self.seq = (self.seq + 1) & 0xFF
        frame = encode(type_, self.seq, payload)
        problems = []
        for attempt in range(self.retries + 1):
            if attempt:
                self.retried += 1
            if problems and problems[-1].startswith("no answer"):
                # The device may sit inside a frame whose length byte was damaged: zeros (never
                # a start byte) fill any such frame; it fails its CRC and the device hunts again.
                self.port.write(bytes(FILL))
            self.port.write(frame)
            self.port.flush()
            status, data = self._await(type_, timeout or self.timeout)
            if status == "ok":
                return data
            problems.append(data)
            if status == "refused":
                break
        raise ProtocolError(f"{self.what} gave no valid answer to command {type_:#04x} after "
                            f"{attempt + 1} tries ({'; '.join(dict.fromkeys(problems))})")

    def _await(self, type_: int, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            frame = self.reader.next_frame()
            if frame is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return "timeout", f"no answer within {timeout:g} s"
                self.port.timeout = min(left, POLL)
                self.reader.feed(self._read())
                continue
            rtype, rseq, payload = frame
            if rtype == BOOT:
                if self.booted_once:
                    raise DeviceReset(f"{self.what} reset in the middle of the session "
                                      "(it sent its boot frame again); no numbers were kept")
                self.booted_once = True
                continue
            if rseq != self.seq:
                continue  # a late answer to an earlier try
            if rtype == ERROR:
                code = payload[0] if payload else 0
                text = payload[1:].decode(errors="replace")
                if code in (1, 2):  # our frame arrived damaged: send it again
                    return "nak", f"device reported {ERRORS[code]}"
                return "refused", f"device refused it: {ERRORS.get(code, code)} ({text})"
            if rtype != (type_ | 0x80):
                return "nak", f"answer of type {rtype:#04x} to command {type_:#04x}"
            return "ok", payload

    def _read(self) -> bytes:
        import serial
        try:
            return self.port.read(max(1, self.port.in_waiting))
        except (serial.SerialException, OSError) as e:
            raise ProtocolError(f"the link to {self.what} closed ({e})")


def parse_hello(payload: bytes) -> dict:
    if len(payload) < 28 or payload[:4] != MAGIC:
        raise ProtocolError(f"the device's hello is not an edgeprune profiler's ({payload[:8]!r})")
    version, n_layers, model_hash, arena, in_b, out_b, stack = struct.unpack_from("<HHIIIII", payload, 4)
    if version != VERSION:
        raise ProtocolError(f"the device speaks profiling protocol version {version}, this host "
                            f"version {VERSION}; rebuild the profiling firmware with this edgeprune")
    return {"version": version, "layers": n_layers, "model_hash": model_hash, "arena_bytes": arena,
            "in_bytes": in_b, "out_bytes": out_b, "stack_size": stack}
