"""Image bytes -> ``uint8`` RGB tensor ``(3, H, W)`` with torchvision or Pillow, after cheap safety checks.

Before any pixel is decoded the bytes are sniffed (``wrong_format`` for audio / text / documents),
their container structure is walked (``truncated`` when a JPEG or PNG ends before its end marker, or a
GIF inside its first image) and the dimensions are read from the header, so a decompression bomb is
refused as ``oversized`` without allocating its pixels. Decoding itself uses
``torchvision.io.decode_image`` for JPEG, and Pillow for PNG, WebP and GIF (see ``_decode_pillow``:
torchvision's PNG reader can crash the process on bad data, and its RGB mode drops transparency where
Hugging Face processors composite it onto white). A GIF is cut after its first image before
decoding, so a few hundred KB of animation frames never cost ``frames x width x height x 3`` bytes.

Example::

    rgb = decode_image_bytes(Path("apple.jpg").read_bytes(), max_bytes=20_000_000,
                             max_pixels=40_000_000)       # uint8 tensor (3, H, W)
"""

from __future__ import annotations

import io
import struct

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image

from tessera.encoders.errors import MediaError, check_size
from tessera.encoders.sniff import sniff

DECODABLE = ("jpeg", "png", "gif", "webp")
# JPEG start-of-frame markers (they carry the image size); C4, C8 and CC are other segments.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_GIF_TRAILER = b"\x3b"


def decode_image_bytes(data: bytes, max_bytes: int, max_pixels: int) -> torch.Tensor:
    """Decode one image to ``uint8`` RGB ``(3, H, W)`` (EXIF orientation applied, first GIF frame only).

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
    if fmt == "gif":  # keep the first image only: torchvision would decode every frame
        (width, height), end = _walk_gif(data)
        data = data[:end] + _GIF_TRAILER
    else:
        width, height = _checked_size(data, fmt)
    _check_pixels(width, height, max_pixels)
    if fmt != "jpeg":  # PNG, WebP, GIF: Pillow (see _decode_pillow); JPEG has no alpha
        return _decode_pillow(data, fmt, max_pixels)
    try:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                           apply_exif_orientation=True)
    except RuntimeError as err:  # torchvision reports every decoder failure as RuntimeError
        raise _decode_failure(fmt, err) from None
    return img  # (3, H, W), uint8


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise MediaError("oversized", f"{width}x{height} pixels, over the limit of {max_pixels}")


def _decode_pillow(data: bytes, fmt: str, max_pixels: int) -> torch.Tensor:
    """A PNG, WebP or GIF through Pillow, not torchvision.

    - torchvision 0.29's PNG reader crashes the whole process (SIGSEGV) on most libpng errors raised
      while reading rows (an empty or cut IDAT stream, a bad data check: 38 of 40 randomly byte-flipped
      PNGs here; pytorch/vision#3613), so one bad upload would kill a serving replica or an embedding
      actor. Pillow raises instead.
    - Transparency is composited onto white, as Hugging Face image processors do (``convert_to_rgb``);
      torchvision's RGB mode dropped the alpha channel, so a product photo on a transparent background
      came out on whatever colour the exporting tool left under it (often black), and two images that
      look the same got different vectors.
    - EXIF orientation applied for every format (torchvision ignored WebP's; Pillow also honours an XMP
      orientation). Opaque 8-bit images give torchvision's RGB pixels; 16-bit samples keep their high
      byte, as torchvision's uint16 -> uint8 conversion does. One copy beyond Pillow's own buffer (the
      array) when the image is already RGB and upright.
    - The size Pillow read is checked against ``max_pixels`` again before any pixel is decoded (the
      header walk and Pillow could disagree on a crafted file)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            _check_pixels(*im.size, max_pixels)
            im.load()  # a GIF: its first frame (the caller cut the others off)
            ImageOps.exif_transpose(im, in_place=True)  # a no-op without an orientation tag
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey (and its 32-bit widening)
                grey = np.asarray(im, dtype=np.uint32) >> 8
                arr = np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
            else:
                arr = np.array(_on_white(im))  # a writable copy, as torch wants
    except MediaError:
        raise
    except Image.DecompressionBombError as err:
        raise MediaError("oversized", f"{fmt}: {err}") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, SystemError) as err:
        raise _decode_failure(fmt, err) from None
    return torch.from_numpy(arr).permute(2, 0, 1)  # (3, H, W), a channels-last view: no copy


def _on_white(im: Image.Image) -> Image.Image:
    """``im`` as RGB, any transparency (an alpha band, a palette's or grey image's transparent colour)
    composited onto white."""
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def _decode_failure(fmt: str, err: Exception) -> MediaError:
    """``truncated`` when the decoder says so (or ran out of data), else ``corrupt``, with its last line."""
    text = str(err).splitlines()[-1][:200] if str(err).strip() else type(err).__name__
    kind = "truncated" if "truncated" in str(err).lower() or isinstance(err, EOFError) else "corrupt"
    return MediaError(kind, f"{fmt} decode failed: {text}")


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
    except Image.DecompressionBombError as err:  # a plain Exception, not an OSError
        raise MediaError("oversized", f"{fmt}: {err}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise MediaError("corrupt", f"{fmt} header unreadable: {err}") from None


def _walk_gif(data: bytes) -> tuple[tuple[int, int], int]:
    """Walk a GIF's blocks to the end of its first image.

    Returns:
        ``((width, height), end)``: the size torchvision decodes (the larger of the logical screen
        and the first image) and the offset just past the first image's data.
    """
    n = len(data)
    if n < 13:
        raise MediaError("truncated", f"GIF header cut short at {n} bytes")
    screen_w, screen_h, flags = struct.unpack("<HHB", data[6:11])
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global colour table
    while pos < n:
        block = data[pos]
        if block == 0x21:  # extension: label byte, then data sub-blocks
            pos = _skip_gif_sub_blocks(data, pos + 2)
        elif block == 0x2C:  # image descriptor
            if pos + 10 > n:
                raise MediaError("truncated", f"GIF image descriptor at byte {pos} cut short")
            width, height, flags = struct.unpack("<HHB", data[pos + 5:pos + 10])
            pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the local colour table
            end = _skip_gif_sub_blocks(data, pos + 1)  # +1: the LZW minimum code size byte
            return (max(screen_w, width), max(screen_h, height)), end
        elif block == 0x3B:
            raise MediaError("corrupt", "GIF has no image before its trailer")
        else:
            raise MediaError("corrupt", f"unexpected GIF block 0x{block:02X} at byte {pos}")
    raise MediaError("truncated", f"GIF ends at byte {n} before its first image")


def _skip_gif_sub_blocks(data: bytes, pos: int) -> int:
    """Offset just past the chain of data sub-blocks (length byte, then data) starting at ``pos``."""
    while pos < len(data):
        size = data[pos]
        pos += 1 + size
        if size == 0:
            return pos
    raise MediaError("truncated", f"GIF data runs past the end of the file ({len(data)} bytes)")


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
    """Walk the PNG chunks; check each is whole and that IEND is reached. The size is the first chunk's,
    which must be the one IHDR (what decoders read): a later IHDR saying 1x1 let a 7000x7000 image past
    ``max_pixels``."""
    pos, n, size = 8, len(data), None
    while pos + 8 <= n:
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        if not ctype.isalpha():
            raise MediaError("corrupt", f"PNG chunk type {ctype!r} at byte {pos} is not a chunk name")
        if pos + 12 + length > n:
            raise MediaError("truncated", f"PNG chunk {ctype.decode()} runs past the end ({n} bytes)")
        if (pos == 8) != (ctype == b"IHDR"):
            raise MediaError("corrupt", "PNG's IHDR chunk is not its first and only header"
                             if ctype == b"IHDR" else f"PNG starts with a {ctype!r} chunk, not IHDR")
        if ctype == b"IHDR":
            if length < 8:
                raise MediaError("corrupt", f"PNG IHDR chunk of {length} bytes")
            size = struct.unpack(">II", data[pos + 8:pos + 16])
        if ctype == b"IEND":
            if size is None:
                raise MediaError("corrupt", "PNG has no IHDR chunk")
            return size
        pos += 12 + length
    raise MediaError("truncated", "PNG ends before its IEND chunk")
