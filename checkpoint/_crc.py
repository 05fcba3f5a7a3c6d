"""CRC-32 for checkpoint files: the fastest implementation installed, and combining the CRCs
of consecutive ranges (so one file is checksummed on several threads at once)."""
from __future__ import annotations

import zlib
from typing import Any, Callable, Optional

__all__ = ["crc32", "crc32_combine"]


def _pick_crc32() -> Callable[..., int]:
    """zlib-ng's CRC-32 where installed (extra ``checkpoint``), else zlib's: the same function
    (the same polynomial and values, so either verifies the other's files), but zlib-ng's is
    vectorised: several times faster than the system zlib here, which matters because the CRC
    is the one pass over the bytes that loading adds to reading them."""
    try:
        from zlib_ng import zlib_ng

        if zlib_ng.crc32(b"123456789") == 0xCBF43926:
            return zlib_ng.crc32
    except ImportError:
        pass
    return zlib.crc32


_CRC32: Optional[Callable[..., int]] = None


def crc32(data: Any, value: int = 0) -> int:
    """CRC-32 of ``data`` continuing from ``value`` (zlib.crc32's contract), the GIL released."""
    global _CRC32
    if _CRC32 is None:
        _CRC32 = _pick_crc32()
    return _CRC32(data, value)


_CRC_POLY = 0xEDB88320  # CRC-32 (zlib's), bit-reflected


def _gf2_mulmod(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial (bit-reflected), as zlib's multmodp."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) mod p for k = 0..31
for _ in range(31):
    _X2N.append(_gf2_mulmod(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of A+B from those of A (``crc1``) and B (``crc2``, ``len2`` bytes): zlib's
    crc32_combine, which Python's zlib does not expose."""
    if len2 <= 0:
        return crc1
    p, n, k = 1 << 31, len2, 3  # x^(8 * len2) mod p, by squares
    while n:
        if n & 1:
            p = _gf2_mulmod(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return _gf2_mulmod(p, crc1) ^ crc2
