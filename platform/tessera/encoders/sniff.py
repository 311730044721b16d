"""Tell what kind of bytes an object holds from its magic bytes, before trying to decode it.

Decoders use this to say ``wrong_format`` (valid bytes of another kind: a WAV behind a ``.jpg``
URI) instead of ``corrupt`` (bytes of no known kind, or of the right kind that fail to decode).

Example::

    sniff(b"\\xff\\xd8\\xff\\xe0...")        # -> ("image", "jpeg")
    sniff(b"RIFF\\x24\\x00\\x00\\x00WAVEfmt ")  # -> ("audio", "wav")
    sniff(b"hello")                       # -> ("text", "text")
"""

from __future__ import annotations

# (family, format, offset, magic); checked in order.
_SIGNATURES: tuple[tuple[str, str, int, bytes], ...] = (
    ("image", "jpeg", 0, b"\xff\xd8\xff"),
    ("image", "png", 0, b"\x89PNG\r\n\x1a\n"),
    ("image", "gif", 0, b"GIF87a"),
    ("image", "gif", 0, b"GIF89a"),
    ("image", "tiff", 0, b"II*\x00"),
    ("image", "tiff", 0, b"MM\x00*"),
    ("audio", "flac", 0, b"fLaC"),
    ("audio", "ogg", 0, b"OggS"),
    ("audio", "mp3", 0, b"ID3"),
    ("document", "pdf", 0, b"%PDF-"),
    ("document", "parquet", 0, b"PAR1"),
    ("document", "zip", 0, b"PK\x03\x04"),
    ("document", "gzip", 0, b"\x1f\x8b"),
)
_RIFF_FORMS = {b"WAVE": ("audio", "wav"), b"WEBP": ("image", "webp"), b"AVI ": ("video", "avi")}


def sniff(data: bytes) -> tuple[str, str] | None:
    """Return ``(family, format)`` for the bytes, or None when they match no known kind.

    Args:
        data: the object's bytes (only the first few dozen are looked at, plus a UTF-8 check
            of the first 4 KiB for text).

    Families are ``image``, ``audio``, ``video``, ``document`` and ``text`` (printable UTF-8).
    """
    if data[:4] == b"RIFF" and len(data) >= 12:
        return _RIFF_FORMS.get(data[8:12])
    if len(data) >= 12 and data[4:8] == b"ftyp":  # ISO BMFF: AVIF / HEIC images, MP4 / M4A
        brand = data[8:12]
        return ("image", "heif") if brand in (b"avif", b"heic", b"heix", b"mif1") else ("video", "mp4")
    if data[:2] == b"BM" and len(data) >= 14 and data[6:10] == b"\0\0\0\0":  # BMP: reserved bytes are 0
        return "image", "bmp"
    for family, fmt, offset, magic in _SIGNATURES:
        if data[offset:offset + len(magic)] == magic:
            return family, fmt
    if is_mp3_frame(data[:4]):
        return "audio", "mp3"
    head = data[:4096]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # a multi-byte character cut by the 4 KiB window is fine
            return None
        text = head[: err.start].decode("utf-8")
    return ("text", "text") if looks_like_text(text) else None


def is_mp3_frame(head: bytes) -> bool:
    """An MPEG-1/2/2.5 Layer III frame header (MP3 without an ID3 tag): sync, then valid bitrate / rate.
    (MPEG 2.5 is the 8 / 11.025 / 12 kHz family: speech at 8 kHz is written as it.)"""
    if len(head) < 4 or head[0] != 0xFF:
        return False
    version, layer = (head[1] >> 3) & 0b11, (head[1] >> 1) & 0b11
    bitrate, rate = head[2] >> 4, (head[2] >> 2) & 0b11
    return (head[1] >> 5 == 0b111 and version != 0b01 and layer == 0b01  # version 01 is reserved
            and bitrate != 0b1111 and rate != 0b11)


def looks_like_text(text: str) -> bool:
    """True when at least 95% of the first 4096 characters are printable (tabs and newlines count)."""
    head = text[:4096]
    if not head:
        return False
    printable = sum(ch.isprintable() or ch in "\t\n\r" for ch in head)
    return printable / len(head) > 0.95
