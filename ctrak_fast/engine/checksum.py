"""The shard checksum that a reader can afford on every search: block CRC-32C.

    shard_checksum(data) = CRC-32C( LE32(CRC-32C(block_0)) || LE32(CRC-32C(block_1)) || ... )

with 1 MiB blocks. CRC-32C runs on the SSE4.2 instruction in `_C` (three independent blocks
interleaved per thread, so the instruction's 3-cycle latency does not bound it), without the GIL,
in the read-ahead thread of the search; benchmarks/bench_verify.py measures its cost. sha256 (the
manifest's `sha256`, `store verify`, `--verify full`) stays the cryptographic check.

The pure-Python functions here are the reference the native ones are tested against.
"""

from __future__ import annotations

from ctrak_fast.engine import native

BLOCK = 1 << 20

_POLY = 0x82F63B78


def _table() -> list[int]:
    out = []
    for b in range(256):
        c = b
        for _ in range(8):
            c = (c >> 1) ^ (_POLY if c & 1 else 0)
        out.append(c)
    return out


_TABLE = _table()


def crc32c_reference(data: bytes, crc: int = 0) -> int:
    """CRC-32C, one byte at a time (slow: tests only).

    Examples:
        >>> hex(crc32c_reference(b"123456789"))
        '0xe3069283'
    """
    c = crc ^ 0xFFFFFFFF
    for byte in bytes(data):
        c = (c >> 8) ^ _TABLE[(c ^ byte) & 0xFF]
    return c ^ 0xFFFFFFFF


def block_crc32c_reference(data: bytes, block: int = BLOCK) -> int:
    """shard_checksum in pure Python (tests only)."""
    data = bytes(data)
    crcs = b"".join(
        crc32c_reference(data[i : i + block]).to_bytes(4, "little")
        for i in range(0, len(data), block)
    )
    return crc32c_reference(crcs)


def shard_checksum(data, block: int = BLOCK) -> int:
    """Block CRC-32C of a contiguous buffer (bytes, numpy array, mapped file), native.

    Examples:
        >>> shard_checksum(b"123456789" * 1000, block=4096) == block_crc32c_reference(
        ...     b"123456789" * 1000, block=4096)
        True
    """
    return int(native.load().block_crc32c(data, block))


__all__ = ["BLOCK", "block_crc32c_reference", "crc32c_reference", "shard_checksum"]
