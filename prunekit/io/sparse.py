"""Sparse checkpoints: a file whose size follows the sparsity, read back bit for bit, never unpickled.

``torch.save`` stores every zero of a pruned model. :func:`save_sparse` stores,
for each tensor, a bitmask of its non-zero entries (bit-packed, LZMA-compressed:
close to the mask's entropy) and only the non-zero values. The values are split
into byte planes (all first bytes, then all second bytes, ...) and each plane is
zlib-compressed when that helps: the sign/exponent bytes of float weights are
highly redundant, the low mantissa bytes are not. Dense tensors (biases,
BatchNorm statistics) keep every value, in the same byte-plane layout.

The format is lossless by default: every tensor comes back with the same
dtype, shape and bit pattern, including ``-0.0`` (torch's ``prune.remove``
leaves one for every pruned negative weight, ``prunekit.finalize`` does not;
their signs are stored as a bitmask beside the mask, only when present) and NaN payloads. The opt-in
``values_dtype=torch.float16`` (or ``torch.bfloat16``) stores float32/float64
values at half precision (the zeros of sparse-stored tensors as ``+0.0``): LOSSY, and labelled so
in the file's header (other tensors stay exact).

File layout (little-endian): the 8 magic bytes ``PKSPARSE``, a uint32 format
version (2), a uint64 header length, the header's uint32 CRC-32 (version 1
files have none), a UTF-8 JSON header (entries, dtypes, shapes, blob offsets,
codecs, CRC-32s), then the blobs, end to end in header order. Loading parses
JSON and raw bytes only (a file cannot run code, unlike a pickle) and checks
everything the file declares before allocating from it; every failure is a
:class:`SparseFormatError`.
"""

from __future__ import annotations

import json
import lzma
import math
import os
import struct
import sys
import warnings
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from prunekit.io.files import PathLike, atomic_write

__all__ = [
    "DEFAULT_MAX_BYTES",
    "FORMAT_VERSION",
    "MAGIC",
    "SparseFormatError",
    "load_sparse",
    "is_sparse_file",
    "read_sparse_header",
    "save_sparse",
]

MAGIC = b"PKSPARSE"
FORMAT_VERSION = 2
_PREAMBLE = struct.Struct("<8sIQ")  # magic, version, header length (version 2 adds the header's CRC-32)
_PREAMBLE_V2 = struct.Struct("<8sIQI")  # magic, version, header length, CRC-32 of the header

_DTYPES: Dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "complex128": torch.complex128,
    "complex64": torch.complex64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_REAL_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_LOSSY_DTYPES = (torch.float16, torch.bfloat16)
# Below this many elements a mask and per-blob bookkeeping cost more than they save.
_MIN_SPARSE_NUMEL = 64
_MAX_HEADER = 16 << 20  # about 40,000 tensors' entries
_LZMA_MEMLIMIT = 128 << 20  # the decoder's own memory (the writer's preset 6 needs about 10 MiB)
_CHUNK = 1 << 18  # bytes read from the file, and elements decoded, at a time

StateDict = Mapping[str, Any]


# --- encoding ------------------------------------------------------------------------


class _Payload:
    """The blobs of a file, appended in order, each described by a JSON-ready dict."""

    def __init__(self) -> None:
        self.chunks: List[bytes] = []
        self.size = 0

    def add(self, raw: bytes, codec: str) -> Dict[str, Any]:
        if codec == "lzma":
            stored = lzma.compress(raw, preset=6)
        elif codec == "zlib":
            stored = zlib.compress(raw, 6)
        else:
            stored = raw
        if len(stored) >= len(raw):
            codec, stored = "raw", raw
        blob = {
            "offset": self.size,
            "length": len(stored),
            "codec": codec,
            "size": len(raw),
            "crc32": zlib.crc32(stored),
        }
        self.chunks.append(stored)
        self.size += len(stored)
        return blob


def _byte_rows(tensor: Tensor) -> np.ndarray:
    """The tensor's bytes as a [numel, element_size] uint8 array (little-endian)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    return flat.view(torch.uint8).numpy().reshape(flat.numel(), flat.element_size())


def _planes(rows: np.ndarray, payload: _Payload) -> List[Dict[str, Any]]:
    # Byte i of every value together: sign/exponent bytes compress, mantissa bytes do not.
    return [payload.add(np.ascontiguousarray(rows[:, i]).tobytes(), "zlib") for i in range(rows.shape[1])]


def _lossy_rows(values: Tensor, key: str, values_dtype: torch.dtype) -> np.ndarray:
    converted = values.to(values_dtype)
    overflow = torch.isinf(converted) & torch.isfinite(values)
    if bool(overflow.any()):
        worst = float(values[overflow].abs().max())
        raise ValueError(
            f"{key!r} holds {worst:g}, beyond the range of {_NAMES[values_dtype]}; use "
            "values_dtype=torch.bfloat16 or None (lossless)"
        )
    return _byte_rows(converted)


def _encode_tensor(
    key: str, tensor: Tensor, payload: _Payload, values_dtype: Optional[torch.dtype]
) -> Dict[str, Any]:
    if tensor.dtype not in _NAMES or tensor.is_quantized or tensor.layout != torch.strided:
        raise TypeError(
            f"{key!r} has dtype {tensor.dtype} / layout {tensor.layout}; save_sparse stores dense "
            f"tensors of dtype {', '.join(_NAMES.values())}"
        )
    tensor = tensor.detach().cpu()
    entry: Dict[str, Any] = {
        "key": key,
        "type": "tensor",
        "dtype": _NAMES[tensor.dtype],
        "shape": list(tensor.shape),
    }
    lossy = values_dtype is not None and tensor.dtype in (torch.float32, torch.float64)
    stored_dtype = values_dtype if lossy else tensor.dtype
    entry["stored_dtype"] = _NAMES[stored_dtype]
    rows = _byte_rows(tensor)
    numel = rows.shape[0]
    stored_width = torch.empty((), dtype=stored_dtype).element_size()
    if tensor.dtype in _REAL_FLOATS:
        # +0.0 and -0.0 are both zero; only the top bit of the last byte is the sign.
        nonzero = (rows[:, :-1] != 0).any(axis=1) | ((rows[:, -1] & 0x7F) != 0)
    else:
        nonzero = (rows != 0).any(axis=1)
    nnz = int(nonzero.sum())
    sparse = numel >= _MIN_SPARSE_NUMEL and nnz * stored_width + numel / 8 < numel * stored_width
    entry["encoding"] = "sparse" if sparse else "dense"
    entry["nnz"] = nnz if sparse else numel
    blobs: Dict[str, Any] = {}
    if sparse:
        blobs["mask"] = payload.add(np.packbits(nonzero).tobytes(), "lzma")
        if tensor.dtype in _REAL_FLOATS and not lossy:
            # Values stored at reduced precision also lose the sign of zero (-0.0 loads as +0.0).
            signs = (rows[~nonzero, -1] & 0x80) != 0
            if signs.any():
                blobs["zero_signs"] = payload.add(np.packbits(signs).tobytes(), "zlib")
        selected = rows[nonzero]
        if lossy:
            index = torch.from_numpy(np.flatnonzero(nonzero))
            selected = _lossy_rows(tensor.reshape(-1)[index], key, stored_dtype)
    else:
        selected = _lossy_rows(tensor.reshape(-1), key, stored_dtype) if lossy else rows
    blobs["planes"] = _planes(selected, payload)
    entry["blobs"] = blobs
    return entry


def _check_json_value(key: str, value: Any) -> None:
    """Accept only values that JSON gives back unchanged (no tuples, no non-str keys, no objects)."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        return
    if isinstance(value, list):
        for item in value:
            _check_json_value(key, item)
        return
    if isinstance(value, dict):
        for name, item in value.items():
            if not isinstance(name, str):
                raise TypeError(f"{key!r}: dict key {name!r} is not a string; save_sparse stores JSON values")
            _check_json_value(key, item)
        return
    raise TypeError(
        f"{key!r} is a {type(value).__name__}; save_sparse stores tensors and JSON values "
        "(None, bool, int, float, str, list, dict with str keys) only, so that loading never runs code"
    )


def _state_dict_of(model_or_state_dict: Union[nn.Module, StateDict]) -> StateDict:
    if isinstance(model_or_state_dict, nn.Module):
        return model_or_state_dict.state_dict()
    if isinstance(model_or_state_dict, Mapping):
        return model_or_state_dict
    raise TypeError(
        f"save_sparse expects an nn.Module or a state_dict (a mapping of names to tensors), got "
        f"{type(model_or_state_dict).__name__}"
    )


def save_sparse(
    model_or_state_dict: Union[nn.Module, StateDict],
    path: PathLike,
    *,
    values_dtype: Optional[torch.dtype] = None,
    arch: Optional[str] = None,
) -> None:
    """Write a checkpoint whose size follows the sparsity of the weights; atomic.

    Lossless by default: :func:`load_sparse` returns every tensor bit for bit.
    Pass a finalized model (:func:`prunekit.finalize`): a model still holding
    pruning reparametrizations saves ``weight_orig`` (dense) and ``weight_mask``,
    which round-trips but is not small (a warning says so).

    Args:
        model_or_state_dict: a model (its ``state_dict()`` is saved) or a state_dict.
            Tensors must be dense; other values must be JSON values (None, bool, int,
            float, str, list, dict).
        path: file to write (its folder is created).
        values_dtype: ``None`` (lossless), or ``torch.float16`` / ``torch.bfloat16`` to
            store float32/float64 values at that precision (sparse-stored zeros as +0.0): LOSSY
            (about half the size); the header records ``"lossy": true`` and loading casts back to the
            original dtype.
        arch: the spec that rebuilds the architecture (``"vgg16"``, ``"package.module:factory"``),
            recorded in the header so that :func:`prunekit.load_model` reads the file as a model
            (``prunekit prune --out model.pksparse`` writes it); ``None`` for a bare state_dict.

    Raises:
        TypeError: a value is neither a supported tensor nor a JSON value.
        ValueError: ``values_dtype`` is not supported, or a value overflows float16.

    Example:
        >>> model = nn.Linear(64, 64)
        >>> with torch.no_grad():
        ...     _ = model.weight.mul_(torch.rand(64, 64) > 0.9)
        >>> save_sparse(model, "linear.pksparse")
        >>> torch.equal(load_sparse("linear.pksparse")["weight"], model.weight)
        True
    """
    if arch is not None and not (isinstance(arch, str) and 0 < len(arch) <= _MAX_ARCH):
        raise ValueError(f"arch={arch!r} must be a non-empty string of at most {_MAX_ARCH} characters, or None")
    if values_dtype is not None and values_dtype not in _LOSSY_DTYPES:
        raise ValueError(
            f"values_dtype={values_dtype!r} is not supported; use None (lossless), "
            "torch.float16 or torch.bfloat16 (lossy)"
        )
    state = _state_dict_of(model_or_state_dict)
    masked = [k for k in state if k.endswith("_orig") and k[: -len("_orig")] + "_mask" in state]
    if masked:
        warnings.warn(
            f"the state_dict still has pruning reparametrizations ({masked[0]!r}, ...): the file "
            "stores the dense originals and the masks; call prunekit.finalize(model) first for a "
            "file that shrinks with the sparsity",
            UserWarning,
            stacklevel=2,
        )
    payload = _Payload()
    entries = []
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict key {key!r} is not a string")
        if isinstance(value, Tensor):
            entries.append(_encode_tensor(key, value, payload, values_dtype))
        else:
            _check_json_value(key, value)
            entries.append({"key": key, "type": "json", "value": value})
    metadata = getattr(state, "_metadata", None)
    header = {
        "format": "prunekit.sparse",
        "version": FORMAT_VERSION,
        "lossy": values_dtype is not None,
        "values_dtype": _NAMES[values_dtype] if values_dtype is not None else None,
        "byteorder": "little",
        "payload_bytes": payload.size,
        "metadata": {k: dict(v) for k, v in metadata.items()} if metadata is not None else None,
        "entries": entries,
    }
    if arch is not None:
        header["arch"] = arch  # optional, so files without it (and readers before it) stay valid
    if metadata is not None:
        _check_json_value("_metadata", header["metadata"])
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    with atomic_write(path, "wb") as handle:
        handle.write(_PREAMBLE_V2.pack(MAGIC, FORMAT_VERSION, len(encoded), zlib.crc32(encoded)))
        handle.write(encoded)
        for chunk in payload.chunks:
            handle.write(chunk)


# --- decoding ------------------------------------------------------------------------
#
# Everything a file declares is checked before anything is allocated from it: the
# header's own checksum (version 2), its exact keys and types, that the blobs tile the
# payload in order (each byte used once, none outside the file), that every decoded size
# follows from the tensors' shapes, and that the tensors fit ``max_bytes`` (or the model).


class SparseFormatError(ValueError):
    """The file is not a valid prunekit sparse checkpoint (the message names the file and the problem)."""


DEFAULT_MAX_BYTES = 2 << 30
"""Default cap on the bytes of tensors one file may make :func:`load_sparse` allocate (2 GiB)."""

_HEADER_KEYS = {"format", "version", "lossy", "values_dtype", "byteorder", "payload_bytes", "metadata", "entries"}
_OPTIONAL_HEADER_KEYS = {"arch"}
_MAX_ARCH = 1000
_TENSOR_KEYS = {"key", "type", "dtype", "stored_dtype", "shape", "encoding", "nnz", "blobs"}
_JSON_KEYS = {"key", "type", "value"}
_BLOB_KEYS = {"offset", "length", "codec", "size", "crc32"}
_CODECS = ("raw", "zlib", "lzma")
_MAX_INT = (1 << 63) - 1
_MAX_DIMS = 32


def _strict_object(pairs: List[Any]) -> Dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a JSON object repeats a key ({sorted(k for k in keys if keys.count(k) > 1)[0]!r})")
    return dict(pairs)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"the header holds {name}, which JSON does not allow")


def _int(value: Any, what: str, fail: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_INT:
        raise fail(f"{what} is {value!r}, not an integer in [0, 2**63)")
    return value


class _Blob:
    __slots__ = ("offset", "length", "codec", "size", "crc32")

    def __init__(self, offset: int, length: int, codec: str, size: int, crc32: int) -> None:
        self.offset, self.length, self.codec, self.size, self.crc32 = offset, length, codec, size, crc32


class _Reader:
    """Reads and checks a file's header; the payload only on demand (not for :func:`read_sparse_header`)."""

    def __init__(self, path: PathLike, header_only: bool = False) -> None:
        self.name = str(path)
        target = Path(path)
        if target.is_dir():
            raise IsADirectoryError(f"{self.name!r} is a folder, not a sparse checkpoint file; name the file inside it")
        if not target.is_file():
            raise FileNotFoundError(f"no such file: {self.name!r}")
        if not target.is_file():
            raise SparseFormatError(f"{self.name!r} is not a regular file (a pipe or device?); pass a sparse checkpoint file")
        handle = open(target, "rb")
        try:
            self.file_size = os.fstat(handle.fileno()).st_size  # of the file opened, not of a later one
            self.version, header_bytes = self._read_preamble(handle)
            self.start = handle.tell()
            self.header = self._parse(header_bytes)
            try:
                self.entries = self._check_entries(self.header)
            except (TypeError, KeyError, AttributeError) as err:  # a value of the wrong JSON type anywhere
                raise self.fail(f"malformed header ({type(err).__name__}: {err})") from None
        except BaseException:
            handle.close()
            raise
        # The payload is never read whole: each blob is streamed from this handle when decoded.
        self.handle: Optional[Any] = None
        if header_only:
            handle.close()
        else:
            self.handle = handle

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def fail(self, reason: str) -> SparseFormatError:
        return SparseFormatError(f"{self.name!r} is a damaged prunekit sparse checkpoint: {reason}; save it again")

    def _read_preamble(self, handle: Any) -> Any:
        head = handle.read(_PREAMBLE.size)
        if len(head) < _PREAMBLE.size or not head.startswith(MAGIC):
            hint = ""
            if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
                hint = " (it looks like a torch.save/pickle file: read it with torch.load(path, weights_only=True))"
            raise SparseFormatError(
                f"{self.name!r} is not a prunekit sparse checkpoint{hint}; write one with "
                "prunekit.save_sparse(model, path)"
            )
        _, version, length = _PREAMBLE.unpack(head)
        if version > FORMAT_VERSION:
            raise SparseFormatError(
                f"{self.name!r} uses sparse format version {version}; this prunekit reads up to "
                f"version {FORMAT_VERSION}: upgrade prunekit"
            )
        if version not in (1, 2):
            raise self.fail(f"format version {version} does not exist")
        crc = None
        if version >= 2:
            extra = handle.read(4)
            if len(extra) < 4:
                raise self.fail("the file ends inside its preamble")
            (crc,) = struct.unpack("<I", extra)
        room = self.file_size - handle.tell()
        if length > room:
            raise self.fail(f"header length {length} exceeds the file")
        if length > _MAX_HEADER:
            raise self.fail(f"the header is {length:,} bytes, more than the {_MAX_HEADER:,} a real one needs")
        header = handle.read(length)
        if crc is not None and zlib.crc32(header) != crc:
            raise self.fail("the header's CRC-32 does not match (corrupted header)")
        # Parsed JSON costs far more memory than its text when it is mostly brackets: a real
        # header has a few containers per few hundred bytes.
        containers = header.count(b"[") + header.count(b"{")
        if containers > len(header) // 16 + 64:
            raise self.fail(f"the header holds {containers:,} JSON lists and objects in {length:,} bytes, "
                            "far more than a real one")
        return version, header

    def _parse(self, raw: bytes) -> Dict[str, Any]:
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_strict_object, parse_constant=_refuse_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise self.fail(f"unreadable header ({type(err).__name__}: {err})") from None
        if not isinstance(header, dict) or header.get("format") != "prunekit.sparse":
            raise self.fail("the header does not describe a prunekit.sparse file")
        if set(header) - _OPTIONAL_HEADER_KEYS != _HEADER_KEYS:
            odd = sorted((set(header) - _OPTIONAL_HEADER_KEYS) ^ _HEADER_KEYS)
            raise self.fail(f"the header has unknown or missing keys {odd}")
        if "arch" in header and not (isinstance(header["arch"], str) and 0 < len(header["arch"]) <= _MAX_ARCH):
            raise self.fail("malformed arch field")
        if header["version"] != self.version:
            raise self.fail(f"the header says version {header['version']!r}, the preamble {self.version}")
        if header["byteorder"] != "little" or sys.byteorder != "little":
            raise SparseFormatError(f"{self.name!r}: only little-endian files on little-endian machines are supported")
        if not isinstance(header["lossy"], bool) or header["values_dtype"] not in (None, "float16", "bfloat16"):
            raise self.fail("bad lossy / values_dtype fields")
        _int(header["payload_bytes"], "payload_bytes", self.fail)
        if header["payload_bytes"] != self.file_size - self.start:
            raise self.fail(f"the file holds {self.file_size - self.start} payload bytes, the header says {header['payload_bytes']}")
        metadata = header["metadata"]
        if metadata is not None and not (
            isinstance(metadata, dict) and all(isinstance(v, dict) for v in metadata.values())
        ):
            raise self.fail("malformed metadata")
        if not isinstance(header["entries"], list):
            raise self.fail("the header has no entry list")
        return header

    def _blob(self, blob: Any, expected_size: int, where: str, cursor: List[int]) -> _Blob:
        if not isinstance(blob, dict) or set(blob) != _BLOB_KEYS:
            raise self.fail(f"malformed blob description for {where}")
        offset = _int(blob["offset"], f"the offset of a blob of {where}", self.fail)
        length = _int(blob["length"], f"the length of a blob of {where}", self.fail)
        size = _int(blob["size"], f"the size of a blob of {where}", self.fail)
        crc = _int(blob["crc32"], f"the CRC-32 of a blob of {where}", self.fail)
        if not isinstance(blob["codec"], str) or blob["codec"] not in _CODECS:
            raise self.fail(f"unknown codec {blob['codec']!r} for {where}")
        if offset != cursor[0]:
            # The writer lays blobs end to end in order: anything else overlaps, leaves gaps or reuses bytes.
            raise self.fail(f"a blob of {where} starts at {offset}, expected {cursor[0]} (blobs must tile the payload)")
        if size != expected_size:
            raise self.fail(f"a blob of {where} declares {size} bytes, its shape implies {expected_size}")
        if blob["codec"] == "raw" and length != size:
            raise self.fail(f"a raw blob of {where} stores {length} bytes for {size}")
        cursor[0] = offset + length
        if cursor[0] > self.header["payload_bytes"]:
            raise self.fail(f"a blob of {where} lies outside the file (truncated?)")
        return _Blob(offset, length, blob["codec"], size, crc)

    def _check_entries(self, header: Mapping[str, Any]) -> List[Dict[str, Any]]:
        entries: List[Dict[str, Any]] = []
        seen = set()
        cursor = [0]
        for raw in header["entries"]:
            if not isinstance(raw, dict) or not isinstance(raw.get("key"), str):
                raise self.fail("malformed entry")
            key = raw["key"]
            if key in seen:
                raise self.fail(f"the entry {key!r} appears twice")
            seen.add(key)
            if raw.get("type") == "json":
                if set(raw) != _JSON_KEYS:
                    raise self.fail(f"the entry {key!r} has unknown or missing keys")
                entries.append({"key": key, "type": "json", "value": raw["value"]})
                continue
            if raw.get("type") != "tensor":
                raise self.fail(f"unknown entry type {raw.get('type')!r}")
            if set(raw) != _TENSOR_KEYS:
                raise self.fail(f"the entry {key!r} has unknown or missing keys {sorted(set(raw) ^ _TENSOR_KEYS)}")
            if not isinstance(raw["dtype"], str) or not isinstance(raw["stored_dtype"], str) \
                    or raw["dtype"] not in _DTYPES or raw["stored_dtype"] not in _DTYPES:
                raise self.fail(f"unknown dtype for {key!r}")
            dtype, stored_dtype = _DTYPES[raw["dtype"]], _DTYPES[raw["stored_dtype"]]
            if stored_dtype != dtype and not (stored_dtype in _LOSSY_DTYPES and dtype in (torch.float32, torch.float64)):
                raise self.fail(f"{key!r} stores {stored_dtype} values for a {dtype} tensor")
            shape = raw["shape"]
            if not isinstance(shape, list) or len(shape) > _MAX_DIMS:
                raise self.fail(f"bad shape {shape!r} for {key!r}")
            for dim in shape:
                _int(dim, f"a dimension of {key!r}", self.fail)
            numel = math.prod(shape)
            if numel > _MAX_INT:
                raise self.fail(f"{key!r} declares {numel} elements")
            encoding = raw["encoding"]
            if not isinstance(encoding, str) or encoding not in ("sparse", "dense"):
                raise self.fail(f"bad encoding for {key!r}")
            nnz = _int(raw["nnz"], f"the non-zero count of {key!r}", self.fail)
            if nnz > numel or (encoding == "dense" and nnz != numel):
                raise self.fail(f"the non-zero count of {key!r} is {nnz} for {numel} elements")
            blobs = raw["blobs"]
            allowed = {"mask", "zero_signs", "planes"} if encoding == "sparse" else {"planes"}
            if not isinstance(blobs, dict) or not set(blobs) <= allowed or "planes" not in blobs:
                raise self.fail(f"bad blobs for {key!r}")
            if encoding == "sparse" and "mask" not in blobs:
                raise self.fail(f"the sparse tensor {key!r} has no mask")
            if "zero_signs" in blobs and (dtype not in _REAL_FLOATS or nnz == numel):
                raise self.fail(f"{key!r} has zero signs it cannot have")
            stored_width = torch.empty((), dtype=stored_dtype).element_size()
            checked: Dict[str, Any] = {}
            if "mask" in blobs:
                checked["mask"] = self._blob(blobs["mask"], (numel + 7) // 8, repr(key), cursor)
            if "zero_signs" in blobs:
                checked["zero_signs"] = self._blob(blobs["zero_signs"], (numel - nnz + 7) // 8, repr(key), cursor)
            planes = blobs["planes"]
            if not isinstance(planes, list) or len(planes) != stored_width:
                raise self.fail(f"{key!r} should have {stored_width} byte planes")
            checked["planes"] = [self._blob(plane, nnz, repr(key), cursor) for plane in planes]
            entries.append({
                "key": key, "type": "tensor", "dtype": dtype, "stored_dtype": stored_dtype, "shape": shape,
                "numel": numel, "encoding": encoding, "nnz": nnz, "blobs": checked,
            })
        if cursor[0] != header["payload_bytes"]:
            raise self.fail(f"the blobs cover {cursor[0]} of the {header['payload_bytes']} payload bytes")
        return entries

    def bytes_needed(self) -> int:
        """Bytes of the tensors the file declares (what loading allocates for its results)."""
        return sum(e["numel"] * torch.empty((), dtype=e["dtype"]).element_size() for e in self.entries if e["type"] == "tensor")

    def stream(self, blob: _Blob) -> "_BlobStream":
        assert self.handle is not None, "opened with header_only"
        return _BlobStream(self, blob)


class _BlobStream:
    """One blob, decoded on demand: stored bytes read from the file a chunk at a time, output handed out exactly.

    :meth:`finish` checks what only the end can tell: the stream ends exactly at the
    blob's end (no trailing bytes, no second stream), it decodes to exactly the declared
    size, and the stored bytes match their CRC-32. The LZMA decoder's memory is capped.
    """

    def __init__(self, reader: _Reader, blob: _Blob) -> None:
        self.reader, self.blob = reader, blob
        self.fd = reader.handle.fileno()  # type: ignore[union-attr]
        self.position = reader.start + blob.offset
        self.stored_left = blob.length
        self.crc = 0
        self.produced = 0
        self.pending = bytearray()
        self.tail = b""  # zlib input not yet consumed
        if blob.codec == "zlib":
            self.decoder: Any = zlib.decompressobj()
        elif blob.codec == "lzma":
            self.decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=_LZMA_MEMLIMIT)
        else:
            self.decoder = None

    def _stored(self, most: int = _CHUNK) -> bytes:
        """The next stored bytes of the blob (at most ``most``; b"" at its end), CRC-32 kept up to date."""
        size = min(most, self.stored_left)
        data = os.pread(self.fd, size, self.position) if size else b""
        if len(data) != size:
            raise self.reader.fail("the file ends inside a blob (truncated while reading?)")
        self.position += size
        self.stored_left -= size
        self.crc = zlib.crc32(data, self.crc)
        return data

    def _decode(self, room: int) -> bytes:
        """Up to ``room`` more decoded bytes (b"" once the stored bytes are used up and nothing is pending)."""
        try:
            if self.decoder is None:
                return self._stored(min(room, _CHUNK))
            if isinstance(self.decoder, lzma.LZMADecompressor):
                if self.decoder.eof:
                    data = self._stored()
                    if data:
                        raise self.reader.fail("bytes follow the end of an lzma stream in a blob")
                    return b""
                data = self._stored() if self.decoder.needs_input else b""
                if not data and self.decoder.needs_input:
                    return b""
                return self.decoder.decompress(data, room)
            data = self.tail or self._stored()
            if not data:
                return b""
            out = self.decoder.decompress(data, room)
            self.tail = self.decoder.unconsumed_tail
            if self.decoder.unused_data:
                raise self.reader.fail("bytes follow the end of a zlib stream in a blob")
            return out
        except (zlib.error, lzma.LZMAError) as err:
            raise self.reader.fail(f"bad {self.blob.codec} data ({err})") from None

    def read(self, count: int) -> np.ndarray:
        """Exactly ``count`` decoded bytes as a uint8 array."""
        while len(self.pending) < count:
            piece = self._decode(count - len(self.pending))
            if not piece:
                if self.decoder is not None and not self.stored_left and not self.tail and not getattr(
                        self.decoder, "eof", True):
                    raise self.reader.fail(f"a {self.blob.codec} stream in a blob is truncated")
                raise self.reader.fail(
                    f"a blob decodes to {self.produced + len(self.pending)} bytes, expected {self.blob.size}")
            self.pending += piece
        out = np.frombuffer(bytes(self.pending[:count]), dtype=np.uint8)
        del self.pending[:count]
        self.produced += count
        return out

    def finish(self) -> None:
        """Check the blob's end: no more output, the stream closed exactly at the blob's end, the CRC-32."""
        if self.pending or self._decode(1):
            raise self.reader.fail(f"a blob decodes to more than the {self.blob.size} bytes its shape implies")
        if self.decoder is not None:
            while self.stored_left or self.tail:
                if self._decode(1):
                    raise self.reader.fail(f"a blob decodes to more than the {self.blob.size} bytes its shape implies")
            if not self.decoder.eof:
                raise self.reader.fail(f"a {self.blob.codec} stream in a blob is truncated")
            if getattr(self.decoder, "unused_data", b""):
                raise self.reader.fail(f"bytes follow the end of a {self.blob.codec} stream in a blob")
        if self.stored_left:
            raise self.reader.fail("a blob holds bytes its stream does not use")
        if self.crc != self.blob.crc32:
            raise self.reader.fail("a blob's CRC-32 does not match (corrupted bytes)")


class _Bits:
    """A bit-packed blob (``np.packbits`` order) read ``count`` bits at a time; its padding bits must be zero."""

    def __init__(self, stream: _BlobStream, total: int, what: str) -> None:
        self.stream, self.left, self.what = stream, total, what
        self.spare = np.zeros(0, dtype=bool)

    def read(self, count: int) -> np.ndarray:
        if count > self.left:
            raise self.stream.reader.fail(f"{self.what} holds fewer bits than needed")
        need = count - len(self.spare)
        if need > 0:
            bits = np.unpackbits(self.stream.read((need + 7) // 8)).astype(bool)
            self.spare = np.concatenate([self.spare, bits])
        out, self.spare = self.spare[:count], self.spare[count:]
        self.left -= count
        return out

    def finish(self) -> None:
        if self.left:
            raise self.stream.reader.fail(f"{self.what} holds more bits than used")
        if self.spare.any():  # what is left of the last byte
            raise self.stream.reader.fail(f"the padding bits of {self.what} are not zero")
        self.stream.finish()


def _decode_tensor(reader: _Reader, entry: Mapping[str, Any]) -> Tensor:
    """Decode one tensor into its result buffer, a chunk of elements at a time.

    Besides the result, memory stays within a few chunks (the payload is streamed from
    the file, the mask and zero signs are unpacked a chunk at a time), so loading a file
    costs about its declared tensors, whatever their size or sparsity.
    """
    key, dtype, stored_dtype, shape = entry["key"], entry["dtype"], entry["stored_dtype"], entry["shape"]
    numel, nnz, blobs = entry["numel"], entry["nnz"], entry["blobs"]
    width = torch.empty((), dtype=dtype).element_size()
    stored_width = torch.empty((), dtype=stored_dtype).element_size()
    sparse = entry["encoding"] == "sparse"
    result = torch.zeros(numel * width, dtype=torch.uint8)
    rows = result.numpy().reshape(numel, width)
    planes = [reader.stream(blob) for blob in blobs["planes"]]
    mask = _Bits(reader.stream(blobs["mask"]), numel, f"the mask of {key!r}") if sparse else None
    signs = None
    if "zero_signs" in blobs:
        signs = _Bits(reader.stream(blobs["zero_signs"]), numel - nnz, f"the zero signs of {key!r}")
    seen = 0
    step = max(8, (_CHUNK // max(width, 1)) // 8 * 8)
    for begin in range(0, numel, step):
        end = min(numel, begin + step)
        nonzero = mask.read(end - begin) if mask is not None else None
        count = int(nonzero.sum()) if nonzero is not None else end - begin
        seen += count
        if seen > nnz:
            raise reader.fail(f"the mask of {key!r} does not match its non-zero count")
        values = np.empty((count, stored_width), dtype=np.uint8)
        for index, plane in enumerate(planes):
            values[:, index] = plane.read(count)
        if stored_dtype != dtype:
            widened = torch.from_numpy(values.reshape(-1)).view(stored_dtype).to(dtype)
            values = widened.view(torch.uint8).numpy().reshape(count, width)
        if nonzero is None:
            rows[begin:end] = values
            continue
        block = rows[begin:end]
        block[nonzero] = values
        if signs is not None:
            zeros = ~nonzero
            negative = signs.read(int(zeros.sum()))
            top = block[:, width - 1]
            top[zeros] = negative.astype(np.uint8) * 0x80
    if seen != nnz:
        raise reader.fail(f"the mask of {key!r} does not match its non-zero count")
    for stream in [*planes, *(b for b in (mask, signs) if b is not None)]:
        stream.finish()
    if dtype == torch.bool:
        return result.view(torch.bool).reshape(shape)
    return result.view(dtype).reshape(shape)


def is_sparse_file(path: PathLike) -> bool:
    """Whether ``path`` is a file that starts with the sparse format's magic bytes (its name does not matter).

    Example:
        >>> is_sparse_file(__file__)
        False
    """
    try:
        with open(path, "rb") as handle:
            return handle.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def read_sparse_header(path: PathLike) -> Dict[str, Any]:
    """The checked JSON header of a sparse checkpoint (``lossy``, ``values_dtype``, ``arch`` when recorded, entries); reads only the header.

    Raises:
        SparseFormatError: not a valid prunekit sparse checkpoint.

    Example:
        >>> save_sparse(nn.Linear(4, 4), "model.pksparse", values_dtype=torch.float16)
        >>> read_sparse_header("model.pksparse")["lossy"]
        True
        >>> save_sparse(nn.Linear(4, 4), "model.pksparse")
        >>> read_sparse_header("model.pksparse")["lossy"]
        False
    """
    return _Reader(path, header_only=True).header


def _check_fits(model: nn.Module, entries: List[Mapping[str, Any]], name: str) -> None:
    """Compare the file's keys and shapes with the model's before decoding anything, so a mismatch costs nothing."""
    expected = model.state_dict()
    declared = {e["key"]: e for e in entries}
    missing = [k for k in expected if k not in declared]
    unexpected = [k for k in declared if k not in expected]
    wrong = [
        f"{k}: file {tuple(declared[k]['shape'])} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in declared and isinstance(v, Tensor) and declared[k]["type"] == "tensor"
        and tuple(v.shape) != tuple(declared[k]["shape"])
    ]
    if not (missing or unexpected or wrong):
        return
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if wrong:
        problems.append(f"shape mismatches {wrong[:3]}{' ...' if len(wrong) > 3 else ''}")
    hint = "load it into the same architecture it was saved from"
    if any(k.endswith(("_orig", "_mask")) for k in missing + unexpected):
        hint = "one side still has pruning masks: call prunekit.finalize(model) on it first"
    elif wrong:
        hint = "a compacted checkpoint loads into a compacted model: run prunekit.compact on the model first"
    raise ValueError(
        f"{name!r} does not fit {type(model).__name__}: {'; '.join(problems)}; {hint}. The model is unchanged"
    )


def load_sparse(
    path: PathLike, model: Optional[nn.Module] = None, *, max_bytes: Optional[int] = None
) -> Union["OrderedDict[str, Any]", nn.Module]:
    """Read a :func:`save_sparse` file: its state_dict, or ``model`` with it loaded (strict).

    Only JSON and raw bytes are parsed, so an untrusted file cannot run code, and
    everything the file declares is checked before anything is allocated from it:
    the header's CRC-32, its exact keys, blobs that tile the payload, decoded sizes
    fixed by the shapes, and the total size of the tensors (``max_bytes``; with a
    ``model``, the model's own shapes bound it). Version-1 files (no header
    checksum) still load.

    Args:
        path: the file.
        model: when given, every key and shape must match it (checked before
            decoding; on mismatch nothing is loaded) and the model is returned.
        max_bytes: the most bytes of tensors the file may make us allocate
            (default :data:`DEFAULT_MAX_BYTES`, 2 GiB; ignored with ``model``).

    Returns:
        The state_dict (an ``OrderedDict`` of CPU tensors with torch's ``_metadata``),
        or ``model``.

    Raises:
        SparseFormatError: (a ``ValueError``) not a prunekit sparse checkpoint, a
            damaged or crafted one, or one whose tensors exceed ``max_bytes``.
        ValueError: a file that does not fit ``model``.

    Example:
        >>> model = nn.Linear(4, 2)
        >>> save_sparse(model, "model.pksparse")
        >>> sorted(load_sparse("model.pksparse"))
        ['bias', 'weight']
        >>> load_sparse("model.pksparse", nn.Linear(4, 2))
        Linear(in_features=4, out_features=2, bias=True)
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    limit = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"max_bytes={max_bytes!r} must be a non-negative int (bytes)")
    reader = _Reader(path)
    if model is not None:
        try:
            _check_fits(model, reader.entries, reader.name)
        except BaseException:
            reader.close()
            raise
    else:
        needed = reader.bytes_needed()
        if needed > limit:
            reader.close()
            raise SparseFormatError(
                f"{reader.name!r} declares {needed:,} bytes of tensors, more than max_bytes={limit:,}; if you "
                f"trust the file, pass load_sparse(..., max_bytes={needed}), or "
                "load it into its model: load_sparse(path, model)"
            )
    state: "OrderedDict[str, Any]" = OrderedDict()
    try:
        for entry in reader.entries:
            state[entry["key"]] = _decode_tensor(reader, entry) if entry["type"] == "tensor" else entry["value"]
    finally:
        reader.close()
    metadata = reader.header.get("metadata")
    if isinstance(metadata, dict):
        state._metadata = OrderedDict((k, dict(v)) for k, v in metadata.items())  # type: ignore[attr-defined]
    if model is None:
        return state
    model.load_state_dict(state, strict=True)
    return model
