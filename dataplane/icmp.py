"""ICMP names and numbers, in one place: the type names Cilium's `icmps` rules accept, the words
Hubble prints for a type and code, and the echo messages a ping probe sends and reads.

Policy names are Cilium's (pkg/policy/api/icmp.go, icmpIpv4TypeNameToCode and
icmpIpv6TypeNameToCode); the text of a type/code pair is what Hubble's summary shows
(gopacket's ICMPv4TypeCode.String(): "EchoRequest", "DestinationUnreachable(Port)").
Pure Python, no kernel.
"""

from __future__ import annotations

import struct

ECHO_REPLY = 0
ECHO_REQUEST = 8
FAMILIES = ("IPv4", "IPv6")

# Cilium's CamelCase names of ICMP types, per family, for `icmps[].fields[].type`.
CILIUM_TYPE_NAMES: dict[str, dict[str, int]] = {
    "IPv4": {
        "EchoReply": 0, "DestinationUnreachable": 3, "Redirect": 5, "Echo": 8, "EchoRequest": 8,
        "RouterAdvertisement": 9, "RouterSelection": 10, "TimeExceeded": 11, "ParameterProblem": 12,
        "Timestamp": 13, "TimestampReply": 14, "Photuris": 40, "ExtendedEchoRequest": 42,
        "ExtendedEchoReply": 43,
    },
    "IPv6": {
        "DestinationUnreachable": 1, "PacketTooBig": 2, "TimeExceeded": 3, "ParameterProblem": 4,
        "EchoRequest": 128, "EchoReply": 129, "MulticastListenerQuery": 130, "MulticastListenerReport": 131,
        "MulticastListenerDone": 132, "RouterSolicitation": 133, "RouterAdvertisement": 134,
        "NeighborSolicitation": 135, "NeighborAdvertisement": 136, "RedirectMessage": 137,
        "RouterRenumbering": 138, "ICMPNodeInformationQuery": 139, "ICMPNodeInformationResponse": 140,
        "InverseNeighborDiscoverySolicitation": 141, "InverseNeighborDiscoveryAdvertisement": 142,
        "HomeAgentAddressDiscoveryRequest": 144, "HomeAgentAddressDiscoveryReply": 145,
        "MobilePrefixSolicitation": 146, "MobilePrefixAdvertisement": 147,
        "DuplicateAddressRequestCodeSuffix": 157, "DuplicateAddressConfirmationCodeSuffix": 158,
        "ExtendedEchoRequest": 160, "ExtendedEchoReply": 161,
    },
}

# What Hubble prints for an ICMPv4 type and its codes (gopacket layers/icmp4.go).
_V4_TYPES: dict[int, tuple[str, tuple[str, ...]]] = {
    0: ("EchoReply", ()),
    3: ("DestinationUnreachable", ("Net", "Host", "Protocol", "Port", "FragmentationNeeded", "SourceRoutingFailed",
                                   "NetUnknown", "HostUnknown", "SourceIsolated", "NetAdminProhibited",
                                   "HostAdminProhibited", "NetTOS", "HostTOS", "CommAdminProhibited",
                                   "HostPrecedence", "PrecedenceCutoff")),
    4: ("SourceQuench", ()),
    5: ("Redirect", ("Net", "Host", "TOS+Net", "TOS+Host")),
    8: ("EchoRequest", ()),
    9: ("RouterAdvertisement", ()),
    10: ("RouterSolicitation", ()),
    11: ("TimeExceeded", ("TTLExceeded", "FragmentReassemblyTimeExceeded")),
    12: ("ParameterProblem", ("PointerIndicatesError", "MissingOption", "BadLength")),
    13: ("TimestampRequest", ()),
    14: ("TimestampReply", ()),
    15: ("InfoRequest", ()),
    16: ("InfoReply", ()),
    17: ("AddressMaskRequest", ()),
    18: ("AddressMaskReply", ()),
}


def type_code_text(icmp_type: int, code: int) -> str:
    """An ICMPv4 type and code as Hubble's summary writes them: 'EchoRequest',
    'DestinationUnreachable(Port)', 'TimeExceeded(Code: 7)', '42(0)'."""
    known = _V4_TYPES.get(icmp_type)
    if known is None:
        return f"{icmp_type}({code})"
    name, codes = known
    if code < len(codes):
        return f"{name}({codes[code]})"
    return name if code == 0 and not codes else f"{name}(Code: {code})"


def type_name(icmp_type: int, family: str = "IPv4") -> str:
    """Cilium's name of a type ('EchoRequest'), else the number as text."""
    names = [n for n, t in CILIUM_TYPE_NAMES[family].items() if t == icmp_type and n != "Echo"]
    return names[0] if names else str(icmp_type)


# ---------------------------------------------------------------------------- echo messages

ECHO_HEADER = struct.Struct("!BBHHH")  # type, code, checksum, id, sequence


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(echo_id: int, sequence: int, payload: bytes) -> bytes:
    """An ICMP echo request message (no IP header), checksummed."""
    head = ECHO_HEADER.pack(ECHO_REQUEST, 0, 0, echo_id, sequence)
    return ECHO_HEADER.pack(ECHO_REQUEST, 0, checksum(head + payload), echo_id, sequence) + payload


def parse_echo_reply(message: bytes) -> tuple[int, int, bytes] | None:
    """(id, sequence, payload) of an ICMP echo reply message (no IP header); None for anything
    else (another type, a message too short, a wrong checksum)."""
    if len(message) < ECHO_HEADER.size:
        return None
    icmp_type, code, _, echo_id, sequence = ECHO_HEADER.unpack_from(message)
    if icmp_type != ECHO_REPLY or code != 0 or checksum(message) != 0:
        return None
    return echo_id, sequence, message[ECHO_HEADER.size:]
