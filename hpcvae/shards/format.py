"""The shard format, once: keys, the .npy codec, the tar writer, the member index reader.

A shard is a plain ustar tar of samples, each two members (WebDataset's convention: files
that share a key before the first dot form one sample):

    g000000123.image.npy   float32 H x W, little-endian, physical pixels (no normalisation)
    g000000123.meta.json   ident, row, zphot, mag, pixel_scale, noise_variance, orig_shape, file, hdu

Keys are ``g`` + the 9-digit catalog row: unique and dot-free.  Everything that writes or
reads shards (ingest, the loaders, evaluate, the benchmarks, the test helpers) goes through
this module (``read_samples`` is the one tar-member parser; ``manifest.iter_samples`` reads a split); ``tests/test_shard.py`` and ``tests/test_use.py`` read the result back with webdataset and wids.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import math
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from hpcvae.errors import ShardError

IMAGE = "image.npy"
META = "meta.json"
PSF = "psf.npy"
"""Each galaxy's PSF (unit sum, float32) where the catalog has PSF_FILENAME/PSF_HDU."""
WIDS_SUFFIX = ".wids.json"
"""``train.wids.json``/``val.wids.json``: the wids shard index of each split, for random access."""
PSF_MEAN = "psf_mean.npy"
"""The set's mean PSF, a file beside the manifest: what model.json records as the training PSF."""


def sample_key(row: int) -> str:
    """The key of catalog row ``row``: ``g000000123``."""
    return f"g{row:09d}"


# -- the .npy codec --------------------------------------------------------------------------------

_NPY_OUT_HEADERS: dict[tuple[tuple[int, ...], str], bytes] = {}


def encode_npy(img: np.ndarray, dtype: str = "<f4") -> bytes:
    """``.npy`` bytes of a little-endian float32 (or ``<f2``) image; the header is cached per shape and dtype."""
    img = np.ascontiguousarray(img, dtype=dtype)
    header = _NPY_OUT_HEADERS.get((img.shape, dtype))
    if header is None:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.zeros(img.shape, dtype), allow_pickle=False)
        header = buf.getvalue()[: -img.nbytes] if img.nbytes else buf.getvalue()
        _NPY_OUT_HEADERS[(img.shape, dtype)] = header
    return header + img.tobytes()


_NPY_IN_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool, int]] = {}


def decode_npy(data: bytes) -> np.ndarray:
    """Parse ``.npy`` bytes without np.load's file machinery (headers repeat, so they are cached)."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise ValueError("not a .npy file (bad magic)")
    major = data[6]
    if major == 1:
        off = 10 + int.from_bytes(data[8:10], "little")
    elif major in (2, 3):
        off = 12 + int.from_bytes(data[8:12], "little")
    else:
        raise ValueError(f"unsupported .npy version {major}")
    head = data[:off]
    parsed = _NPY_IN_HEADERS.get(head)
    if parsed is None:
        start = 10 if major == 1 else 12
        try:
            d = ast.literal_eval(head[start:].decode("latin1"))
            dtype = np.dtype(d["descr"])
            shape = tuple(int(s) for s in d["shape"])
            fortran = bool(d["fortran_order"])
        except (ValueError, SyntaxError, KeyError, TypeError) as exc:
            raise ValueError(f"bad .npy header: {exc}") from None
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed")
        parsed = (dtype, shape, fortran, math.prod(shape))
        if len(_NPY_IN_HEADERS) < 64:
            _NPY_IN_HEADERS[head] = parsed
    dtype, shape, fortran, n = parsed
    if len(data) - off != n * dtype.itemsize:
        raise ValueError(f"truncated .npy: {len(data) - off} data bytes, expected {n * dtype.itemsize}")
    arr = np.frombuffer(data, dtype=dtype, count=n, offset=off)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


# -- the tar index reader ---------------------------------------------------------------------------


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large values
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def tar_members(f: BinaryIO) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file in a ustar/pax/GNU tar, reading headers only.

    Python's tarfile spends ~0.25 ms per member parsing headers (WebDataset's writer adds a
    pax header to each); this reads only what the loader needs and seeks over the data, so
    skipping samples on resume costs one 512-byte read each.  Raises ValueError on damage.
    """
    pos = 0
    pax: dict[str, str] = {}
    long_name: str | None = None
    while True:
        f.seek(pos)
        hdr = f.read(512)
        if len(hdr) == 0:
            return
        if len(hdr) < 512:
            raise ValueError(f"header at byte {pos} cut short")
        if hdr.count(0) == 512:
            return
        if _octal(hdr[148:156]) != sum(hdr) - sum(hdr[148:156]) + 256:
            raise ValueError(f"bad header checksum at byte {pos}")
        size = _octal(hdr[124:136])
        kind = hdr[156:157]
        data = pos + 512
        nxt = data + (size + 511) // 512 * 512
        if kind in (b"x", b"g", b"L"):
            payload = f.read(size)
            if len(payload) != size:
                raise ValueError(f"extended header at byte {pos} cut short")
            if kind == b"x":
                pax = _pax_records(payload)
            elif kind == b"L":
                long_name = payload.split(b"\0", 1)[0].decode("utf-8")
            pos = nxt
            continue
        name = hdr[:100].split(b"\0", 1)[0].decode("utf-8")
        if hdr[257:262] == b"ustar" and hdr[345] != 0:
            name = hdr[345:500].split(b"\0", 1)[0].decode("utf-8") + "/" + name
        name = pax.get("path", long_name or name)
        if "size" in pax:
            size = int(pax["size"])
            if size < 0:
                raise ValueError(f"negative member size {size} at byte {pos}")
            nxt = data + (size + 511) // 512 * 512
        pax, long_name = {}, None
        if kind in (b"0", b"\0", b"7"):
            yield name, data, size
        pos = nxt


def _pax_records(payload: bytes) -> dict[str, str]:
    """``"<len> <key>=<value>\n"`` records; a length that does not move forward is damage, not a loop."""
    out: dict[str, str] = {}
    i = 0
    while i < len(payload) and payload[i] != 0:
        sp = payload.find(b" ", i)
        if sp < 0 or not payload[i:sp].isdigit():
            raise ValueError(f"bad pax record at offset {i}")
        n = int(payload[i:sp])
        if n <= sp - i + 1 or i + n > len(payload):  # must cover its own length field and stay inside
            raise ValueError(f"bad pax record length {n} at offset {i}")
        key, _, value = payload[sp + 1 : i + n - 1].partition(b"=")
        out[key.decode("utf-8")] = value.decode("utf-8")
        i += n
    return out


# -- writing ---------------------------------------------------------------------------------------


class ShardWriter:
    """A plain (ustar) tar writer that hashes while writing.

    ``tarfile``'s stream mode copies every member through 10 kB chunks; writing
    header + data + padding in one call is ~2x faster per galaxy, and computing the
    sha256 on the way out saves re-reading the shard.  Fixed member metadata (mtime 0,
    no owner) makes shards byte-reproducible from the same input.
    """

    def __init__(self, path: str) -> None:
        self.f = open(path, "wb", buffering=1 << 20)  # closed in close() / abort()
        self.h = hashlib.sha256()
        self.sha256 = ""
        """The shard's sha256, once closed."""
        self.size = 0

    def _write(self, b: bytes) -> None:
        self.h.update(b)
        self.f.write(b)
        self.size += len(b)

    def add(self, name: str, data: bytes) -> None:
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        ti.mode = 0o444
        header = ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
        self._write(header + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE))

    def close(self) -> str:
        """Write the end-of-archive blocks (padded to a whole record, like tarfile) and return the sha256."""
        end = 2 * tarfile.BLOCKSIZE
        end += -(self.size + end) % tarfile.RECORDSIZE
        self._write(b"\0" * end)
        self.f.close()
        self.sha256 = self.h.hexdigest()
        return self.sha256

    def abort(self) -> None:
        self.f.close()

    def add_sample(
        self, key: str, image: np.ndarray, meta: dict[str, Any], psf: np.ndarray | None = None
    ) -> None:
        """One sample: ``KEY.image.npy``, ``KEY.meta.json`` (sorted keys: byte-reproducible), ``KEY.psf.npy``.

        The image keeps its dtype when it is float16 (``hpcvae.shard --dtype float16``), else float32.
        """
        self.add(f"{key}.{IMAGE}", encode_npy(image, "<f2" if image.dtype == np.float16 else "<f4"))
        self.add(f"{key}.{META}", json.dumps(meta, sort_keys=True).encode())
        if psf is not None:
            self.add(f"{key}.{PSF}", encode_npy(psf))

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# -- reading ---------------------------------------------------------------------------------------


def read_samples(
    path: str | Path,
    *,
    first: int = 0,
    end: int | None = None,
    want: np.ndarray | None = None,
    expect: int | None = None,
) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """``(index in shard, key, {extension: bytes})`` of samples ``first <= index < end``, in tar order.

    The one tar-member parser: samples are runs of members that share a key (WebDataset's rule).
    ``want[index - first]`` false skips a sample with header reads only (a resume, another rank's
    range); ``expect`` is the manifest's count, and a shard that ends before ``min(end, expect)``
    samples is a ShardError naming the last complete key.  Any damage is a ShardError naming the shard.
    """
    path = Path(path)
    stop = end if end is not None else expect
    key: str | None = None
    idx = -1
    cur: dict[str, bytes] | None = None
    try:
        with open(path, "rb") as f:
            for name, offset, size in tar_members(f):
                k, _, ext = name.rpartition("/")[2].partition(".")
                if k != key:
                    if cur is not None:
                        yield idx, key or "", cur
                        cur = None
                    key, idx = k, idx + 1
                    if stop is not None and idx >= stop:
                        return
                    if idx >= first and (want is None or want[idx - first]):
                        cur = {}
                if cur is not None:
                    f.seek(offset)
                    data = f.read(size)
                    if len(data) != size:
                        raise ValueError(f"member {name} ends after {len(data)} of {size} bytes")
                    cur[ext] = data
            if cur is not None:
                yield idx, key or "", cur
    except (ValueError, OSError) as exc:
        if isinstance(exc, ShardError):
            raise
        at = f" (at sample {key})" if key else ""
        raise ShardError(f"{path}: corrupt or truncated shard{at}: {exc}") from None
    if expect is not None and idx + 1 < min(stop if stop is not None else expect, expect):
        raise ShardError(
            f"{path}: truncated shard: holds {idx + 1} samples, the manifest says {expect}"
            + (f" (last complete key {key})" if key else "")
        )


def read_shard(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` of every sample of one shard, in tar order; ShardError on damage."""
    for _, key, files in read_samples(path):
        yield key, files


def decode_sample(path: Path, key: str, files: dict[str, bytes]) -> tuple[np.ndarray, dict[str, Any]]:
    """(image as float32, meta) of one sample; ShardError naming shard and key when either is unusable."""
    for part in (IMAGE, META):
        if part not in files:
            raise ShardError(f"{path}: sample {key} lacks {part} (has {sorted(files)})")
    try:
        img = decode_npy(files[IMAGE])
        meta = json.loads(files[META])
    except (ValueError, UnicodeDecodeError) as exc:
        raise ShardError(f"{path}: sample {key}: unreadable: {exc}") from None
    if img.ndim != 2:
        raise ShardError(f"{path}: sample {key}: expected a 2-D image, got shape {img.shape}")
    return img.astype(np.float32, copy=False), meta
