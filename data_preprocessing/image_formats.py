"""What the bytes of a JPEG or PNG promise, read without decoding them: the facts that
``prepare.load_image`` checks before it lets Pillow decode (see its docstring).

Pillow decodes whatever pixel data a file holds and, once a stream *ends cleanly*, fills
the rest of the image without saying so: a PNG whose zlib stream stops after 10 of 100
rows, or a JPEG cut in half with an end marker appended, decode without an error. These
helpers measure the data itself so the caller can refuse such files:

- ``jpeg_layout``: the frame (size, components and their sampling), every scan header,
  where the entropy-coded data of the first scan ends, and how many bytes of entropy-coded
  data the file holds in all.
- ``png_layout`` and ``png_inflated_bytes``: the bytes every row needs, and the bytes the
  IDAT stream really inflates to (counted in bounded steps, never held whole).

Pure Python over the raw bytes, no decoder: the marker search is a regular expression
(about 30 ms for a 14 MB JPEG of noise, against 380 ms to decode it); the PNG count is
one extra inflate (about 60% of a PNG decode).
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Iterator

# ---------------------------------------------------------------------------------------
# JPEG
# ---------------------------------------------------------------------------------------

# A marker inside entropy-coded data is 0xFF followed by anything but 0x00 (a stuffed
# 0xFF), 0xD0-0xD7 (restart markers, part of the scan) or 0xFF (fill before a marker).
_MARKER_RE = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_SOI, _EOI, _SOS, _DHT, _DAC = 0xD8, 0xD9, 0xDA, 0xC4, 0xCC
_STANDALONE = {0x01, _SOI, *range(0xD0, 0xD8)}  # markers without a length field
_SOF = set(range(0xC0, 0xD0)) - {_DHT, 0xC8, _DAC}  # SOF0..SOF15
_ARITHMETIC_SOF = {0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PROGRESSIVE_SOF = {0xC2, 0xC6, 0xCA, 0xCE}


@dataclass(frozen=True)
class JpegComponent:
    id: int
    h: int  # horizontal sampling factor, 1..4
    v: int  # vertical sampling factor, 1..4


@dataclass(frozen=True)
class JpegScan:
    components: tuple[int, ...]  # component ids coded in this scan
    ss: int  # spectral selection start (0 = DC)
    se: int  # spectral selection end (63 for a sequential scan)
    ah: int  # successive approximation: bit position of the previous scan (0 = first)
    al: int  # successive approximation: bit position of this scan (0 = full precision)


@dataclass(frozen=True)
class JpegLayout:
    """The structure of a JPEG up to its end-of-image marker."""

    sof: int  # the frame marker's low byte: 0xC0 baseline, 0xC2 progressive, ...
    width: int
    height: int
    components: tuple[JpegComponent, ...]
    scans: tuple[JpegScan, ...]
    entropy_bytes: int  # bytes of entropy-coded data in all scans (restart markers included)
    first_scan_end: int  # offset of the first marker after the first scan's data
    has_eoi: bool

    @property
    def arithmetic(self) -> bool:
        return self.sof in _ARITHMETIC_SOF

    @property
    def progressive(self) -> bool:
        return self.sof in _PROGRESSIVE_SOF

    def blocks(self) -> int:
        """8x8 blocks the frame holds, summed over its components (each at its sampling)."""
        hmax = max(c.h for c in self.components)
        vmax = max(c.v for c in self.components)
        return sum(math.ceil(math.ceil(self.width * c.h / hmax) / 8)
                   * math.ceil(math.ceil(self.height * c.v / vmax) / 8) for c in self.components)

    def missing_coefficients(self) -> list[str]:
        """Components whose coefficients no scan codes to full precision (empty when complete).

        A sequential scan codes coefficients 0-63 of its components at full precision; a
        progressive file needs, for every component and coefficient, a scan that reaches
        bit 0 (``al == 0``). A file cut short and closed with an end marker lacks its
        last scans, so some coefficient never gets there.
        """
        missing = []
        for comp in self.components:
            done = set()
            for scan in self.scans:
                if comp.id in scan.components and scan.al == 0:
                    done.update(range(scan.ss, scan.se + 1) if self.progressive else range(64))
            if len(done) < 64:
                missing.append(f"component {comp.id}: coefficients {min(set(range(64)) - done)}.. never complete")
        return missing


def _u16(data: bytes, i: int) -> int:
    return struct.unpack_from(">H", data, i)[0]


def _parse_sof(seg: bytes) -> tuple[int, int, tuple[JpegComponent, ...]]:
    height, width = _u16(seg, 1), _u16(seg, 3)
    comps = tuple(JpegComponent(seg[6 + 3 * k], max(1, seg[7 + 3 * k] >> 4), max(1, seg[7 + 3 * k] & 15))
                  for k in range(seg[5]))
    return width, height, comps


def _parse_sos(seg: bytes) -> JpegScan:
    n = seg[0]
    ss, se, a = seg[1 + 2 * n], seg[2 + 2 * n], seg[3 + 2 * n]
    return JpegScan(tuple(seg[1 + 2 * k] for k in range(n)), ss, se, a >> 4, a & 15)


def jpeg_layout(data: bytes) -> JpegLayout | None:
    """Walk the markers of a JPEG to its end-of-image marker; None when it has no frame or scan.

    Segments are skipped by their length (so an EXIF thumbnail's markers are never seen);
    after a scan header the entropy-coded data runs to the next marker that is not a
    restart marker. Raises ``ValueError`` on a segment that runs past the end of the data.
    """
    sof, size, comps, scans = None, (0, 0), (), []
    entropy, first_scan_end, has_eoi = 0, -1, False
    pos, in_scan = 2, False
    while pos < len(data):
        m = _MARKER_RE.search(data, pos)
        if m is None:  # the data ends inside a scan (or in junk): no end marker
            entropy += (len(data) - pos) if in_scan else 0
            break
        i, code = m.start(), data[m.start() + 1]
        if in_scan:
            entropy += i - pos
            first_scan_end = i if first_scan_end < 0 else first_scan_end
            in_scan = False
        if code == _EOI:
            has_eoi = True
            break
        if code in _STANDALONE:
            pos = i + 2
            continue
        if i + 4 > len(data) or i + 2 + _u16(data, i + 2) > len(data):
            raise ValueError(f"JPEG segment 0xFF{code:02X} at byte {i} runs past the end of the data")
        end = i + 2 + _u16(data, i + 2)
        seg = data[i + 4:end]
        if code in _SOF and sof is None:
            sof = code
            size_w, size_h, comps = _parse_sof(seg)
            size = (size_w, size_h)
        elif code == _SOS:
            scans.append(_parse_sos(seg))
            in_scan = True
        pos = end
    if sof is None or not scans or not comps:
        return None
    if first_scan_end < 0:
        first_scan_end = len(data)
    return JpegLayout(sof, size[0], size[1], comps, tuple(scans), entropy, first_scan_end, has_eoi)


# ---------------------------------------------------------------------------------------
# PNG
# ---------------------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
# Adam7: (x start, y start, x step, y step) of each of the 7 passes.
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_INFLATE_STEP = 1 << 20  # inflate at most 1 MiB at a time: the count needs no buffer


@dataclass(frozen=True)
class PngLayout:
    width: int
    height: int
    bit_depth: int
    colour_type: int
    interlaced: bool

    def raw_bytes(self) -> int:
        """Bytes the IDAT stream must inflate to: every row of every pass, plus its filter byte."""
        bits = self.bit_depth * _CHANNELS.get(self.colour_type, 4)
        passes = _ADAM7 if self.interlaced else ((0, 0, 1, 1),)
        total = 0
        for x0, y0, dx, dy in passes:
            w = max(0, math.ceil((self.width - x0) / dx))
            h = max(0, math.ceil((self.height - y0) / dy))
            if w and h:  # an empty pass has no filter bytes either
                total += h * (1 + math.ceil(w * bits / 8))
        return total


def png_layout(data: bytes) -> PngLayout | None:
    """The IHDR of a PNG; None when the data does not start with one."""
    if not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR" or len(data) < 29:
        return None
    w, h, depth, colour, _, _, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    return PngLayout(w, h, depth, colour, interlace == 1)


def _idat_chunks(data: bytes) -> Iterator[memoryview]:
    view, pos = memoryview(data), len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IEND":
            return
        if kind == b"IDAT":
            yield view[pos + 8:pos + 8 + length]  # a chunk cut short yields what is there
        pos += 12 + length


def png_inflated_bytes(data: bytes, needed: int) -> int:
    """Bytes the IDAT stream inflates to, counted up to ``needed`` (more is not read).

    Raises ``zlib.error`` when the stream is not valid zlib data.
    """
    inflater, got = zlib.decompressobj(), 0
    for chunk in _idat_chunks(data):
        pending = chunk
        while pending and got < needed and not inflater.eof:
            got += len(inflater.decompress(pending, _INFLATE_STEP))
            pending = inflater.unconsumed_tail
        if got >= needed or inflater.eof:
            break
    return got
