"""Image bytes -> ``uint8`` RGB tensor ``(3, H, W)`` with torchvision, after cheap safety checks.

Before any pixel is decoded the bytes are sniffed (``wrong_format`` for audio / text / documents),
their container structure is walked (``truncated`` when a JPEG or PNG ends before its end marker) and
the dimensions are read from the header, so a decompression bomb is refused as ``oversized`` without
allocating its pixels. Decoding itself uses ``torchvision.io.decode_image`` (JPEG, PNG, GIF, WebP).

Example::

    rgb = decode_image_bytes(Path("apple.jpg").read_bytes(), max_bytes=20_000_000,
                             max_pixels=40_000_000)       # uint8 tensor (3, H, W)
"""

from __future__ import annotations

import io
import struct

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from tessera.encoders.errors import MediaError, check_size
from tessera.encoders.sniff import sniff

DECODABLE = ("jpeg", "png", "gif", "webp")
# JPEG start-of-frame markers (they carry the image size); C4, C8 and CC are other segments.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def decode_image_bytes(data: bytes, max_bytes: int, max_pixels: int) -> torch.Tensor:
    """Decode one image to ``uint8`` RGB ``(3, H, W)`` (EXIF orientation applied, first GIF frame).

    Raises:
        MediaError: ``empty``, ``oversized`` (bytes or pixels), ``wrong_format``, ``truncated``,
            ``corrupt``.
    """
    check_size(data, max_bytes)
    found = sniff(data)
    if found is None:
        raise MediaError("corrupt", "not a recognisable image (unknown magic bytes)")
    family, fmt = found
    if family != "image":
        raise MediaError("wrong_format", f"expected an image, got {fmt} bytes")
    if fmt not in DECODABLE:
        raise MediaError("wrong_format", f"{fmt} images are not supported (expected one of {DECODABLE})")
    width, height = _checked_size(data, fmt)
    if width * height > max_pixels:
        raise MediaError("oversized", f"{width}x{height} pixels, over the limit of {max_pixels}")
    try:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                           apply_exif_orientation=True)
    except RuntimeError as err:  # torchvision reports every decoder failure as RuntimeError
        kind = "truncated" if "truncated" in str(err).lower() else "corrupt"
        raise MediaError(kind, f"{fmt} decode failed: {str(err).splitlines()[-1][:200]}") from None
    if img.ndim == 4:  # animated GIF: (frames, 3, H, W)
        img = img[0]
    if img.dtype != torch.uint8:  # 16-bit PNG
        img = TF.to_dtype(img, torch.uint8, scale=True)
    return img  # (3, H, W)


def _checked_size(data: bytes, fmt: str) -> tuple[int, int]:
    """``(width, height)`` from the header, after checking the container is whole."""
    if fmt == "jpeg":
        return _walk_jpeg(data)
    if fmt == "png":
        return _walk_png(data)
    if fmt == "webp" and struct.unpack("<I", data[4:8])[0] + 8 > len(data):
        raise MediaError("truncated", "WebP RIFF header declares more bytes than present")
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise MediaError("corrupt", f"{fmt} header unreadable: {err}") from None


def _walk_jpeg(data: bytes) -> tuple[int, int]:
    """Walk the JPEG marker segments up to the scan; check the file ends with its EOI marker."""
    pos, n, size = 2, len(data), None
    while True:
        if pos + 4 > n:
            raise MediaError("truncated", f"JPEG ends inside its header at byte {n}")
        if data[pos] != 0xFF:
            raise MediaError("corrupt", f"JPEG marker expected at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers
            pos += 2
            continue
        if marker < 0xC0 or marker in (0xD8, 0xD9):
            raise MediaError("corrupt", f"unexpected JPEG marker 0x{marker:02X} before the scan")
        seg_len = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if seg_len < 2:
            raise MediaError("corrupt", f"JPEG segment of length {seg_len} at byte {pos}")
        if pos + 2 + seg_len > n:
            raise MediaError("truncated", f"JPEG segment at byte {pos} runs past the end ({n} bytes)")
        if marker in _SOF and seg_len >= 7:
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            size = (width, height)
        pos += 2 + seg_len
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            break
    if size is None:
        raise MediaError("corrupt", "JPEG has no frame header (SOF) before its scan")
    if data.rfind(b"\xff\xd9", pos) < 0:
        raise MediaError("truncated", "JPEG has no end-of-image marker: the scan data is cut short")
    return size


def _walk_png(data: bytes) -> tuple[int, int]:
    """Walk the PNG chunks; check each is whole and that IEND is reached."""
    pos, n, size = 8, len(data), None
    while pos + 8 <= n:
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        if not ctype.isalpha():
            raise MediaError("corrupt", f"PNG chunk type {ctype!r} at byte {pos} is not a chunk name")
        if pos + 12 + length > n:
            raise MediaError("truncated", f"PNG chunk {ctype.decode()} runs past the end ({n} bytes)")
        if ctype == b"IHDR" and length >= 8:
            size = struct.unpack(">II", data[pos + 8:pos + 16])
        if ctype == b"IEND":
            if size is None:
                raise MediaError("corrupt", "PNG has no IHDR chunk")
            return size
        pos += 12 + length
    raise MediaError("truncated", "PNG ends before its IEND chunk")
