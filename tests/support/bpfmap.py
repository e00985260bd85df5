"""A BPF map another process holds, reached the way `bpftool map` reaches it: its id from the
holder's /proc/PID/fdinfo, a descriptor from BPF_MAP_GET_FD_BY_ID, and the bpf(2) commands on it
(root). Tests use it to change the kernel's state behind a lab agent's back, which nothing of
l7lab offers (the agent is the only writer of its maps), so that `l7lab policy get` has a real
difference to find."""

from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path

_SYS_BPF = {"x86_64": 321, "aarch64": 280}
BPF_MAP_LOOKUP_ELEM, BPF_MAP_DELETE_ELEM, BPF_MAP_GET_FD_BY_ID = 1, 3, 14
BPF_MAP_TYPE_LPM_TRIE = 11
_ATTR_SIZE = 128  # union bpf_attr is larger than any member used here; the rest stays zero

_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    number = _SYS_BPF.get(platform.machine())
    if number is None:
        raise OSError(f"bpf(2) syscall number unknown for {platform.machine()}")
    ret = _libc.syscall(number, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def map_ids(pid: int, map_type: int, key_size: int, value_size: int) -> list[int]:
    """Ids of the maps process `pid` holds with that type and key and value sizes."""
    out = []
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            fields = dict(line.split(":", 1) for line in info.read_text().splitlines() if ":" in line)
        except OSError:
            continue  # a descriptor closed meanwhile
        if "map_id" in fields and (int(fields["map_type"]), int(fields["key_size"]), int(fields["value_size"])) == \
                (map_type, key_size, value_size):
            out.append(int(fields["map_id"]))
    return sorted(set(out))


def _map_fd(map_id: int) -> int:
    attr = (ctypes.c_uint8 * _ATTR_SIZE)()
    ctypes.c_uint32.from_buffer(attr, 0).value = map_id  # map_id; next_id and open_flags stay 0
    return _bpf(BPF_MAP_GET_FD_BY_ID, attr)


def _elem_attr(fd: int, key: bytes, value: ctypes.Array | None) -> tuple[ctypes.Array, ctypes.Array]:
    attr = (ctypes.c_uint8 * _ATTR_SIZE)()
    key_buf = (ctypes.c_uint8 * len(key)).from_buffer_copy(key)
    ctypes.c_uint32.from_buffer(attr, 0).value = fd  # map_fd
    ctypes.c_uint64.from_buffer(attr, 8).value = ctypes.addressof(key_buf)  # key
    if value is not None:
        ctypes.c_uint64.from_buffer(attr, 16).value = ctypes.addressof(value)  # value
    return attr, key_buf


def lookup(map_id: int, key: bytes, value_size: int) -> bytes | None:
    """The value under `key` (an exact key; for an LPM trie, the longest match), or None."""
    fd = _map_fd(map_id)
    try:
        value = (ctypes.c_uint8 * value_size)()
        attr, _key = _elem_attr(fd, key, value)
        try:
            _bpf(BPF_MAP_LOOKUP_ELEM, attr)
        except FileNotFoundError:
            return None
        return bytes(value)
    finally:
        os.close(fd)


def delete(map_id: int, key: bytes) -> None:
    fd = _map_fd(map_id)
    try:
        attr, _key = _elem_attr(fd, key, None)
        _bpf(BPF_MAP_DELETE_ELEM, attr)
    finally:
        os.close(fd)
