"""Per-item media errors: every bad input becomes a :class:`MediaError` with a ``kind`` to count by.

An embedding pipeline records the error of each failed item (``str(err)``) and counts failures by
``err.kind``; nothing about a bad item is raised as a generic exception. The kinds are:

===============  ===================================================================================
``empty``        zero bytes, an empty / whitespace-only text, or audio with no samples
``not_utf8``     text bytes that are not valid UTF-8
``corrupt``      bytes of the expected kind (or of no known kind) that fail to decode, state an
                 implausible header (an audio sample rate outside 1 kHz..768 kHz), or make the
                 decoder raise anything else (``Preprocessor.map`` records it as ``unexpected <type>``)
``truncated``    a file cut short: its header promises more data than follows
``oversized``    over the configured ``max_bytes``, or an image over ``max_pixels``
``wrong_format`` valid bytes of another kind (a WAV or a text where a JPEG is expected, ...)
``missing``      the object (or the URI itself) is absent
===============  ===================================================================================

Example::

    try:
        data = fetch_media(storage, uri, max_bytes=cfg.max_bytes)
        pixels = preprocess(data)
    except MediaError as err:
        errors[item_id] = str(err)          # "truncated: WAV data chunk declares 9600 bytes ..."
        counts[err.kind] += 1
"""

from __future__ import annotations

from typing import Literal, get_args

from tessera.storage import Storage, parse_uri

MediaErrorKind = Literal["empty", "not_utf8", "corrupt", "truncated", "oversized", "wrong_format", "missing"]
MEDIA_ERROR_KINDS: tuple[str, ...] = get_args(MediaErrorKind)


class MediaError(ValueError):
    """One input item cannot be embedded; ``kind`` is one of :data:`MEDIA_ERROR_KINDS`.

    Args:
        kind: the failure class to count by.
        detail: a short human-readable reason (no payload bytes).

    Pickles cleanly, so it crosses the Ray boundary as itself.
    """

    def __init__(self, kind: str, detail: str = ""):
        if kind not in MEDIA_ERROR_KINDS:
            raise ValueError(f"unknown media error kind {kind!r}; expected one of {MEDIA_ERROR_KINDS}")
        super().__init__(kind, detail)
        self.kind = kind
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}" if self.detail else self.kind

    @classmethod
    def missing(cls, uri: str) -> MediaError:
        """The error for an absent object, e.g. when reading ``uri`` raised ``FileNotFoundError``."""
        return cls("missing", f"no object at {uri}")


def fetch_media(storage: Storage, uri: str, max_bytes: int | None = None) -> bytes:
    """Read one media object, turning absent / oversized objects into :class:`MediaError`.

    Args:
        storage: where ``uri`` lives (``s3://`` or local).
        uri: the object's URI.
        max_bytes: refuse objects larger than this without downloading them.

    Raises:
        MediaError: ``missing`` (absent or unreadable object, malformed URI) or ``oversized``.

    Example::

        data = fetch_media(Storage(), "s3://tessera-demo/corpus/media/images/i1.jpg", 20_000_000)
    """
    try:
        local = parse_uri(uri).scheme == "file"
    except ValueError as err:
        raise MediaError("missing", f"invalid URI: {err}") from None
    from botocore.exceptions import ClientError, ParamValidationError

    try:
        return storage.read_bytes(uri, max_bytes=max_bytes)
    except (FileNotFoundError, IsADirectoryError):
        raise MediaError.missing(uri) from None
    except PermissionError as err:  # 403: no read access (or, without list access, no such key), archived
        raise MediaError("missing", f"object at {uri} not readable: {err}") from None
    except ParamValidationError as err:  # a bucket or key S3 cannot name (e.g. "s3://Bad_Bucket!/x.jpg")
        raise MediaError("missing", f"invalid URI {uri}: {_first_line(err)}") from None
    except ClientError as err:
        # only the store's word on this URI fails the item; anything else (5xx and throttling after
        # read_bytes's retry window, expired or wrong credentials, a skewed clock) fails the job
        code = err.response.get("Error", {}).get("Code")
        if code not in _BAD_URI_CODES:
            raise
        raise MediaError("missing", f"object at {uri} refused by the store ({code})") from None
    except ValueError as err:
        if "over the limit" in str(err):  # Storage.read_bytes's size limit
            raise MediaError("oversized", str(err)) from None
        raise MediaError("missing", f"invalid path {uri!r}: {err}") from None  # e.g. a NUL in a local path
    except OSError as err:
        if not local:  # botocore's timeouts and connection errors are OSErrors too: the store, not the item
            raise
        raise MediaError("missing", f"{uri} not readable: {err.strerror or err}") from None  # too long, EIO...


# S3 error codes that say the URI itself is bad (the item's fault, not the store's or the credentials')
_BAD_URI_CODES = frozenset({"InvalidBucketName", "KeyTooLongError", "InvalidObjectName", "InvalidURI"})


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def check_size(data: bytes, max_bytes: int) -> None:
    """Raise ``empty`` for zero bytes and ``oversized`` above ``max_bytes``."""
    if not data:
        raise MediaError("empty", "zero bytes")
    if len(data) > max_bytes:
        raise MediaError("oversized", f"{len(data)} bytes, over the limit of {max_bytes}")
