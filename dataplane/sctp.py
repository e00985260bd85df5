"""SCTP packets, in one place: the CRC32c checksum and the few chunks an association attempt
needs (INIT, INIT-ACK, ABORT), built and read as bytes (the SCTP common header and chunks, no
IP header). Pure Python, no kernel.

The lab speaks SCTP without the kernel's SCTP stack (many kernels have none, or have it as a
module nobody loaded): the pod servers answer an INIT from a raw IP socket of protocol 132 and
the prober sends it from one, so an association attempt is real traffic through the datapath
while neither side needs `CONFIG_IP_SCTP`. Only the first exchange of the four-way handshake is
spoken: an INIT answered by an INIT-ACK proves the packets crossed both ways, which is all a
policy verdict is about.

Formats are RFC 9260's (section 3: common header, chunk header, INIT and INIT ACK fields, the
State Cookie parameter; appendix A: CRC32c).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

INIT = 1
INIT_ACK = 2
ABORT = 6
CHUNK_NAMES = {INIT: "INIT", INIT_ACK: "INIT_ACK", ABORT: "ABORT"}
STATE_COOKIE = 7  # INIT ACK parameter type (mandatory in an INIT ACK)
ABORT_FLAG_T = 0x01  # the T bit: the verification tag is the receiver's own (reflected)

COMMON_HEADER = struct.Struct("!HHII")  # source port, destination port, verification tag, checksum
CHUNK_HEADER = struct.Struct("!BBH")  # type, flags, length (header included, padding excluded)
INIT_FIELDS = struct.Struct("!IIHHI")  # initiate tag, a_rwnd, outbound streams, inbound streams, initial TSN


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return tuple(table)


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC32c (Castagnoli) of `data`, as RFC 3720 B.4 and RFC 9260 appendix A define it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _checksummed(packet: bytes) -> bytes:
    """`packet` with its checksum field set. The CRC goes on the wire least significant byte
    first (RFC 9260 appendix A: the reflected CRC's bytes in transmission order)."""
    zeroed = packet[:8] + b"\x00\x00\x00\x00" + packet[12:]
    return packet[:8] + struct.pack("<I", crc32c(zeroed)) + packet[12:]


def checksum_ok(packet: bytes) -> bool:
    """Whether an SCTP packet's checksum is right."""
    return len(packet) >= COMMON_HEADER.size and _checksummed(packet) == packet


def _chunk(kind: int, flags: int, value: bytes) -> bytes:
    length = CHUNK_HEADER.size + len(value)
    return CHUNK_HEADER.pack(kind, flags, length) + value + b"\x00" * (-length % 4)


def _packet(sport: int, dport: int, tag: int, chunk: bytes) -> bytes:
    return _checksummed(COMMON_HEADER.pack(sport, dport, tag, 0) + chunk)


def init(sport: int, dport: int, initiate_tag: int, initial_tsn: int) -> bytes:
    """An INIT: verification tag 0 (no association yet), our tag in the chunk."""
    if not initiate_tag:
        raise ValueError("an INIT's initiate tag must not be 0")
    return _packet(sport, dport, 0, _chunk(INIT, 0, INIT_FIELDS.pack(initiate_tag, 65536, 10, 10, initial_tsn)))


def init_ack(request: "Packet", initiate_tag: int, initial_tsn: int, cookie: bytes) -> bytes:
    """The INIT-ACK answering `request` (an INIT): ports swapped, verification tag the INIT's
    initiate tag, our own tag and a State Cookie parameter."""
    param_length = 4 + len(cookie)
    param = struct.pack("!HH", STATE_COOKIE, param_length) + cookie + b"\x00" * (-param_length % 4)
    fields = INIT_FIELDS.pack(initiate_tag, 65536, 10, 10, initial_tsn)
    return _packet(request.dport, request.sport, request.initiate_tag, _chunk(INIT_ACK, 0, fields + param))


def abort_for(request: "Packet") -> bytes:
    """The ABORT an SCTP stack sends for an INIT to a port nobody listens on: the INIT's
    initiate tag as verification tag, T bit clear (RFC 9260 8.4 and 8.5.1; Linux's
    sctp_sf_tabort_8_4_8)."""
    return _packet(request.dport, request.sport, request.initiate_tag, _chunk(ABORT, 0, b""))


@dataclass(frozen=True)
class Packet:
    """The parts of an SCTP packet the lab reads: ports, verification tag, the first chunk's
    type and flags, and for an INIT or INIT-ACK the initiate tag."""

    sport: int
    dport: int
    tag: int
    chunk: int
    flags: int = 0
    initiate_tag: int = 0

    @property
    def chunk_name(self) -> str:
        return CHUNK_NAMES.get(self.chunk, str(self.chunk))


def parse(packet: bytes) -> Packet | None:
    """The SCTP packet in `packet` (from the common header on); None when it is too short,
    its first chunk cut, or its checksum wrong (an SCTP stack discards those silently)."""
    if len(packet) < COMMON_HEADER.size + CHUNK_HEADER.size or not checksum_ok(packet):
        return None
    sport, dport, tag, _ = COMMON_HEADER.unpack_from(packet)
    kind, flags, length = CHUNK_HEADER.unpack_from(packet, COMMON_HEADER.size)
    if length < CHUNK_HEADER.size or COMMON_HEADER.size + length > len(packet):
        return None
    initiate_tag = 0
    if kind in (INIT, INIT_ACK):
        if length < CHUNK_HEADER.size + INIT_FIELDS.size:
            return None
        initiate_tag = INIT_FIELDS.unpack_from(packet, COMMON_HEADER.size + CHUNK_HEADER.size)[0]
    return Packet(sport, dport, tag, kind, flags, initiate_tag)


def strip_ipv4(datagram: bytes) -> tuple[str, str, bytes] | None:
    """(source address, destination address, payload) of an IPv4 datagram as a raw socket
    reads it; None when it is not one."""
    if len(datagram) < 20 or datagram[0] >> 4 != 4:
        return None
    header = (datagram[0] & 0x0F) * 4
    if header < 20 or len(datagram) < header:
        return None
    source = ".".join(str(b) for b in datagram[12:16])
    destination = ".".join(str(b) for b in datagram[16:20])
    return source, destination, datagram[header:]
