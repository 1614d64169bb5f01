"""Fast, deterministic codecs for small samples: PNG without row filters and a streaming tar reader.

Why not PIL and tarfile: on 28x28x3 images PIL spends about 100 us per decode in plugin machinery and tarfile
about 60 us per member parsing headers, together more than the loader's whole budget; the paths below take
about 10 us per image and 5 us per member (measured on the 2-core dev machine). The PNGs we write are
standard (PIL and every viewer read them): 8-bit, no interlace, filter type 0 on every row, so decoding is
zlib plus a reshape. PNGs written elsewhere fall back to PIL.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import mmap
import os
import struct
import zlib
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)
PNG_CHANNELS = {v: k for k, v in PNG_COLOR_TYPES.items()}
ZLIB_LEVEL = 6
TAR_BLOCK = 512
_ZERO_BLOCK = bytes(TAR_BLOCK)
_REGULAR = frozenset(b"0\x007")  # typeflags of regular files


class FormatError(ValueError):
    """Bytes that are not the PNG or tar they claim to be (truncated, bad header or checksum)."""


# ---------------------------------------------------------------------------------------------------- PNG


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png(image: np.ndarray) -> bytes:
    """PNG of an uint8 [H, W] or [H, W, C] image (C in 1-4): filter 0, fixed zlib level, no extra chunks."""
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"encode_png wants uint8 [H, W] or [H, W, C], got {image.dtype} {list(image.shape)}")
    h, w = image.shape[:2]
    c = 1 if image.ndim == 2 else image.shape[2]
    if c not in PNG_COLOR_TYPES:
        raise ValueError(f"encode_png: {c} channels, expected 1-4")
    rows = np.zeros((h, 1 + w * c), dtype=np.uint8)  # column 0: filter type 0 (None) for every row
    rows[:, 1:] = image.reshape(h, w * c)
    header = struct.pack(">IIBBBBB", w, h, 8, PNG_COLOR_TYPES[c], 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), ZLIB_LEVEL))
        + _png_chunk(b"IEND", b"")
    )


MAX_PNG_PIXELS = 2**26
"""Most pixels a PNG may declare (8192 x 8192) when the caller expects no exact shape; checked in its IHDR
before any decompression (a 20000x20000 header on a few KiB of data inflates to gigabytes)."""


def png_header(data: bytes) -> tuple[int, int, int, int, int]:
    """(width, height, bit depth, colour type, interlace) of a PNG's IHDR, which the format puts first."""
    if data[:8] != PNG_SIGNATURE:
        raise FormatError(f"not a PNG (starts {data[:8]!r})")
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise FormatError("PNG without a leading IHDR chunk")
    w, h, depth, color_type, _, _, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    return w, h, depth, color_type, interlace


def check_png_size(data: bytes, max_pixels: int = MAX_PNG_PIXELS) -> tuple[int, int]:
    """(width, height) of a PNG whose header declares at most ``max_pixels``; FormatError otherwise."""
    w, h, *_ = png_header(data)
    if w * h > max_pixels:
        raise FormatError(f"PNG header declares {w}x{h} = {w * h:,} pixels, more than the {max_pixels:,} "
                          "expected (a decompression bomb or the wrong image); not decoded")
    return w, h


def decode_png(data: bytes, *, max_pixels: int = MAX_PNG_PIXELS) -> np.ndarray:
    """uint8 [H, W, C] of a PNG; the fast path covers our own files, anything else goes through PIL. The
    header's size is checked against ``max_pixels`` before anything is decompressed."""
    check_png_size(data, max_pixels)
    header, idat = None, []
    pos = 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        tag = data[pos + 4 : pos + 8]
        if tag == b"IHDR":
            header = struct.unpack_from(">IIBBBBB", data, pos + 8)
        elif tag == b"IDAT":
            idat.append(data[pos + 8 : pos + 8 + length])
        elif tag == b"IEND":
            break
        pos += 12 + length
    else:
        raise FormatError(f"truncated PNG ({len(data)} bytes, no IEND chunk)")
    if header is None:
        raise FormatError("PNG without IHDR chunk")
    w, h, depth, color_type, _, _, interlace = header
    if depth == 8 and interlace == 0 and color_type in PNG_CHANNELS:
        c = PNG_CHANNELS[color_type]
        expected = h * (1 + w * c)
        try:  # never inflate past what the header declares
            raw = zlib.decompressobj().decompress(b"".join(idat), expected + 1)
        except zlib.error as exc:
            raise FormatError(f"corrupt PNG image data ({exc})") from exc
        if len(raw) != expected:
            raise FormatError(f"PNG image data is {len(raw)} bytes, {w}x{h}x{c} needs {expected}")
        rows = np.frombuffer(raw, dtype=np.uint8).reshape(h, 1 + w * c)
        if not rows[:, 0].any():
            return rows[:, 1:].reshape(h, w, c)
    return _decode_png_pil(data)


def _decode_png_pil(data: bytes) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            arr = np.asarray(img)
    except (Image.DecompressionBombError, SyntaxError, struct.error) as exc:  # PIL's PNG parser raises these
        raise FormatError(f"PNG not decodable: {type(exc).__name__}: {exc}") from exc
    return arr[:, :, None] if arr.ndim == 2 else arr


# ---------------------------------------------------------------------------------------------------- tar


def _read_all(stream: IO[bytes]) -> bytes:
    """Everything left in ``stream`` (pipes may return short reads)."""
    chunks = []
    while chunk := stream.read(1 << 22):
        chunks.append(chunk)
    return b"".join(chunks)


def _cstring(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8")


def _octal(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for large numbers
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _first_bad_checksum(data: bytes, headers: list[int], stored: list[int]) -> int | None:
    """Index of the first header whose checksum (bytes summed, the field itself as spaces) differs from the
    stored one, or None: all headers of a shard at once in numpy (per header in Python costs ~5 us). Headers
    sit on 512-byte blocks, so they are gathered as whole rows of the block view (no per-byte index)."""
    if not headers:
        return None
    usable = len(data) - len(data) % TAR_BLOCK
    blocks = np.frombuffer(data, dtype=np.uint8, count=usable).reshape(-1, TAR_BLOCK)
    rows = blocks[np.asarray(headers) // TAR_BLOCK]  # (N, 512)
    computed = rows.sum(1, dtype=np.int64) - rows[:, 148:156].sum(1, dtype=np.int64) + 8 * 32
    bad = np.flatnonzero(computed != np.asarray(stored))
    return int(bad[0]) if len(bad) else None


def tar_index(data: bytes | mmap.mmap, where: str = "tar") -> tuple[list[tuple[str, int, int]], str | None]:
    """(name, start, end) of each regular file of a whole tar in memory, up to any damage, and the damage's
    message (None: intact): ustar, GNU long names, pax paths; header checksums checked in one numpy pass.

    The loop does the least per member (two octal fields, the name) because the loader's budget is a few
    microseconds per member; rarer header forms take the slower branches."""
    n, pos = len(data), 0
    headers: list[int] = []  # offset of every header
    stored: list[int] = []  # its stored checksum
    members: list[tuple[int, str, int, int]] = []  # (header index, name, start, end) of regular files
    long_name: str | None = None
    last = None  # the previous member's name, for error messages
    error = None
    while pos < n:
        if pos + TAR_BLOCK > n:
            if data[pos:] != _ZERO_BLOCK[: n - pos]:
                error = f"{where}: truncated tar header ({n - pos} of 512 bytes) after member {last!r}"
            break
        try:  # the common case first: NUL-terminated octal fields
            checksum, size = int(data[pos + 148 : pos + 154], 8), int(data[pos + 124 : pos + 135], 8)
        except ValueError:
            header = data[pos : pos + TAR_BLOCK]
            if header == _ZERO_BLOCK:
                break
            try:
                checksum, size = _octal(header[148:156]), _octal(header[124:136])
            except ValueError as exc:
                error = f"{where}: corrupt tar header after member {last!r} ({exc})"
                break
        headers.append(pos)
        stored.append(checksum)
        typeflag = data[pos + 156]
        name = data[pos : pos + 100].split(b"\0", 1)[0].decode("utf-8")
        if data[pos + 345] and data[pos + 257 : pos + 263] == b"ustar\0":  # POSIX prefix field (not GNU)
            name = _cstring(data[pos + 345 : pos + 500]) + "/" + name
        start = pos + TAR_BLOCK
        pos = start + size + (-size) % TAR_BLOCK
        last = name
        if pos > n:
            error = f"{where}: truncated tar member {name!r} ({max(0, n - start)} of {size} bytes)"
            break
        if typeflag in _REGULAR:
            members.append((len(headers) - 1, long_name or name, start, start + size))
            long_name = None
        elif typeflag == 76:  # b"L": GNU long name of the next member
            long_name = _cstring(data[start : start + size])
        elif typeflag == 120:  # b"x": pax extended header
            for record in data[start : start + size].decode("utf-8").splitlines():
                _, _, keyval = record.partition(" ")
                key, _, value = keyval.partition("=")
                if key == "path":
                    long_name = value
    bad = _first_bad_checksum(data, headers, stored)
    if bad is not None:
        before = next((m[1] for m in reversed(members) if m[0] < bad), None)
        members = [m for m in members if m[0] < bad]
        error = f"{where}: tar header checksum mismatch after member {before!r}"
    return [(name, start, end) for _, name, start, end in members], error


def iter_tar_members(
    source: bytes | mmap.mmap | IO[bytes], where: str = "tar"
) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file of a tar (its bytes or mapping, or a stream read whole); FormatError
    naming ``where`` on a truncated archive or a bad header checksum, raised after the members before the
    damage."""
    if isinstance(source, (bytes, mmap.mmap)):
        data = source
    else:
        data = bytes(source) if isinstance(source, (bytearray, memoryview)) else _read_all(source)
    members, error = tar_index(data, where)
    for name, start, end in members:
        yield name, data[start:end]
    if error is not None:
        raise FormatError(error)


def group_samples(members: Iterator[tuple[str, bytes]], url: str) -> Iterator[dict[str, Any]]:
    """webdataset samples ``{'__key__', '__url__', suffix: bytes}`` from consecutive members sharing a key
    (key = the path up to the first dot of the base name, suffix = the rest, lower-cased; names without a dot
    or whose base name starts with ``__`` are skipped, as webdataset does)."""
    sample: dict[str, Any] | None = None
    key_now = None
    for name, data in members:
        slash = name.rfind("/") + 1
        dot = name.find(".", slash)
        if dot <= slash or name.startswith("__", slash):
            continue
        key, suffix = name[:dot], name[dot + 1 :].lower()
        if key != key_now:
            if sample is not None:
                yield sample
            sample, key_now = {"__key__": key, "__url__": url}, key
        elif suffix in sample:
            raise FormatError(f"{url}: sample {key!r} has {suffix!r} twice")
        sample[suffix] = data
    if sample is not None:
        yield sample


# ---------------------------------------------------------------------------------------------------- HTTP

HTTP_RETRIES = 3
"""Retries of one shard or manifest download (failed request, HTTP error status or dropped connection)."""
HTTP_BACKOFF_S = 0.5
"""Wait before retry k (k = 0, 1, ...): HTTP_BACKOFF_S * 2**k seconds."""
HTTP_TIMEOUT_S = 60.0
"""Socket timeout of one request."""
HTTP_DEADLINE_S = 900.0
"""Wall-clock limit on one whole shard or manifest download, retries included (a server that trickles a
byte every few seconds never trips the per-read timeout)."""
HTTP_MAX_BYTES = 2**31
"""Most bytes read from one URL whose size the manifest does not give (2 GiB; shards are a few MB)."""


class LimitError(OSError):
    """A download past its deadline or byte cap: not retried."""


def is_http(url: str) -> bool:
    """Whether ``url`` is an http(s) URL (read by :class:`HTTPReader`)."""
    return url.startswith(("http://", "https://"))


class HTTPReader(io.RawIOBase):
    """A read-only byte stream of an http(s) URL that survives up to ``retries`` failures in all.

    A failed request, an error status (e.g. 404) or a connection dropped mid-body is retried after a backoff;
    a retry resumes at the current byte (a Range request, or re-reading and discarding when the server ignores
    Range). When the retries are spent, OSError names the URL, the attempts and the last failure. The whole
    download must end within ``deadline_s`` and hold at most ``max_bytes`` (checked as bytes arrive, and
    against a declared Content-Length up front): :class:`LimitError` otherwise.
    """

    def __init__(self, url: str, *, retries: int = HTTP_RETRIES, deadline_s: float | None = None,
                 max_bytes: int | None = None) -> None:
        import time

        super().__init__()
        self.url, self.retries, self.failures, self.pos = url, retries, 0, 0
        self.length: int | None = None
        self.deadline = time.monotonic() + (HTTP_DEADLINE_S if deadline_s is None else deadline_s)
        self.max_bytes = HTTP_MAX_BYTES if max_bytes is None else max_bytes
        self._response = self._connect()

    def readable(self) -> bool:
        return True

    def _remaining(self) -> float:
        """Seconds left before the deadline; LimitError once it has passed."""
        import time

        left = self.deadline - time.monotonic()
        if left <= 0:
            raise LimitError(f"{self.url}: not downloaded within {HTTP_DEADLINE_S:g} s ({self.pos:,} bytes "
                             "read); the server is too slow or stalled")
        return left

    def _failed(self, exc: BaseException) -> None:
        """Count a failure: raise once the retries are spent (or at once for a limit), else back off."""
        import time

        if isinstance(exc, LimitError):
            raise exc
        self.failures += 1
        if self.failures > self.retries:
            raise OSError(
                f"{self.url}: {type(exc).__name__}: {exc} (gave up after {self.failures} attempts; "
                "check the URL and the server)"
            ) from exc
        time.sleep(min(HTTP_BACKOFF_S * 2 ** (self.failures - 1), self._remaining()))

    def _connect(self):
        import http.client
        import urllib.request

        while True:
            headers = {"Range": f"bytes={self.pos}-"} if self.pos else {}
            try:
                response = urllib.request.urlopen(
                    urllib.request.Request(self.url, headers=headers),
                    timeout=min(HTTP_TIMEOUT_S, self._remaining()),
                )
                if self.pos and response.status != 206:  # Range ignored: skip what we already have
                    skipped = 0
                    while skipped < self.pos:
                        chunk = response.read(min(1 << 20, self.pos - skipped))
                        if not chunk:
                            raise http.client.IncompleteRead(b"", self.pos - skipped)
                        skipped += len(chunk)
                elif not self.pos and response.headers.get("Content-Length"):
                    self.length = int(response.headers["Content-Length"])
                    if self.length > self.max_bytes:
                        response.close()
                        raise LimitError(f"{self.url}: Content-Length {self.length:,} bytes, more than the "
                                         f"{self.max_bytes:,} expected; check the URL and the manifest")
                return response
            except (OSError, http.client.HTTPException) as exc:
                self._failed(exc)

    def readinto(self, buffer) -> int:
        import http.client

        while True:
            try:
                self._bound_socket_wait()
                chunk = self._response.read1(len(buffer))  # returns as soon as some bytes arrived
                n = len(chunk)
                buffer[:n] = chunk
                if n == 0 and len(buffer) and self.length is not None and self.pos < self.length:
                    raise http.client.IncompleteRead(b"", self.length - self.pos)
                self.pos += n
                if self.pos > self.max_bytes:
                    raise LimitError(f"{self.url}: more than {self.max_bytes:,} bytes, the size expected; "
                                     "stopped reading (check the URL and the manifest)")
                return n
            except (OSError, http.client.HTTPException) as exc:
                self._response.close()
                self._failed(exc)
                self._response = self._connect()

    def _bound_socket_wait(self) -> None:
        """Make the next socket read wait no longer than the deadline allows (LimitError if it passed)."""
        left = min(HTTP_TIMEOUT_S, self._remaining())
        sock = getattr(getattr(getattr(self._response, "fp", None), "raw", None), "_sock", None)
        if sock is not None:  # http.client's socket file: SocketIO._sock
            sock.settimeout(left)

    def close(self) -> None:
        if not self.closed:
            self._response.close()
        super().close()


def fetch_url(url: str, *, max_bytes: int | None = None) -> bytes:
    """The whole body of an http(s) URL, with :class:`HTTPReader`'s retries, deadline and byte cap."""
    with HTTPReader(url, max_bytes=max_bytes) as reader:
        return reader.read()


# ---------------------------------------------------------------------------------------------------- shards


def is_local(url: str) -> bool:
    """Whether ``url`` is a plain file path (no ``scheme:`` before its first slash)."""
    return os.path.isabs(url) or ":" not in url.split("/", 1)[0]


def open_shard(url: str, *, size: int | None = None) -> IO[bytes]:
    """A binary stream of a shard: a local path, an http(s) URL (with retries, a deadline and a cap of
    ``size`` bytes when known), or another URL that webdataset's gopen opens (``pipe:`` commands, given
    explicitly by the user)."""
    if is_http(url):
        return io.BufferedReader(HTTPReader(url, max_bytes=size), buffer_size=1 << 20)
    if not is_local(url):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return open(url, "rb", buffering=1 << 20)


def _map_file(path: str) -> bytes | mmap.mmap:
    """A local file's bytes, memory-mapped read-only: the page cache's pages, not a copy (a 500-tuple raw
    shard read into a fresh buffer cost ~27 ms of page faults and copying on the busy 2-core machine)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def read_shard(url: str, *, size: int | None = None, sha256: str | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one shard (.tar or .tar.gz) at a path or URL (:func:`open_shard`), read whole into memory
    (a 500-sample PolyMNIST shard is 6-8 MB).

    ``size`` (bytes) and ``sha256``, when given, are checked (a local file's size before reading); a mismatch
    raises FormatError naming the shard.
    """
    if size is not None and is_local(url) and os.path.getsize(url) != size:
        raise FormatError(
            f"{url}: {os.path.getsize(url)} bytes, the manifest says {size}; run `mmebm data verify`"
        )
    if is_local(url):
        data = _map_file(url)
    else:
        stream = open_shard(url, size=size)
        try:
            data = _read_all(stream)
        except BaseException:
            with contextlib.suppress(OSError):
                stream.close()
            raise
        stream.close()  # for pipe: raises if the command failed
    if size is not None and len(data) != size:
        raise FormatError(f"{url}: {len(data)} bytes, the manifest says {size}; run `mmebm data verify`")
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise FormatError(
            f"{url}: sha256 {hashlib.sha256(data).hexdigest()} differs from the manifest's {sha256}; "
            "run `mmebm data verify`"
        )
    if data[:2] == b"\x1f\x8b":  # a .tar.gz shard
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise FormatError(f"{url}: corrupt gzip ({exc})") from exc
    yield from group_samples(iter_tar_members(data, url), url)
