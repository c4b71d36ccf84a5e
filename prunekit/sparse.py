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
version, a uint64 header length, a UTF-8 JSON header (entries, dtypes, shapes,
blob offsets, codecs, CRC-32s), then the blobs. Loading parses JSON and raw
bytes only: a file cannot run code, unlike a pickle.
"""

from __future__ import annotations

import json
import lzma
import math
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

from prunekit.io import PathLike, atomic_write

__all__ = ["FORMAT_VERSION", "MAGIC", "load_sparse", "read_sparse_header", "save_sparse"]

MAGIC = b"PKSPARSE"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<8sIQ")

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
_MAX_HEADER = 1 << 30

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

    Raises:
        TypeError: a value is neither a supported tensor nor a JSON value.
        ValueError: ``values_dtype`` is not supported, or a value overflows float16.

    Example:
        >>> model = nn.Linear(64, 64)
        >>> with torch.no_grad():
        ...     _ = model.weight.mul_(torch.rand(64, 64) > 0.9)
        >>> save_sparse(model, "linear.pksparse")  # doctest: +SKIP
        >>> torch.equal(load_sparse("linear.pksparse")["weight"], model.weight)  # doctest: +SKIP
        True
    """
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
    if metadata is not None:
        _check_json_value("_metadata", header["metadata"])
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    with atomic_write(path, "wb") as handle:
        handle.write(_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(encoded)))
        handle.write(encoded)
        for chunk in payload.chunks:
            handle.write(chunk)


# --- decoding ------------------------------------------------------------------------


class _Reader:
    def __init__(self, path: PathLike) -> None:
        self.name = str(path)
        target = Path(path)
        if not target.is_file():
            raise FileNotFoundError(f"no such file: {self.name!r}")
        self.data = memoryview(target.read_bytes())
        self.header = self._read_header()
        self.start = _PREAMBLE.size + self.header_length

    def fail(self, reason: str) -> ValueError:
        return ValueError(f"{self.name!r} is a damaged prunekit sparse checkpoint: {reason}; save it again")

    def _read_header(self) -> Dict[str, Any]:
        head = bytes(self.data[: _PREAMBLE.size])
        if len(head) < _PREAMBLE.size or not head.startswith(MAGIC):
            hint = ""
            if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
                hint = " (it looks like a torch.save/pickle file: read it with torch.load(path, weights_only=True))"
            raise ValueError(
                f"{self.name!r} is not a prunekit sparse checkpoint{hint}; write one with "
                "prunekit.save_sparse(model, path)"
            )
        _, version, length = _PREAMBLE.unpack(head)
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{self.name!r} uses sparse format version {version}; this prunekit reads up to "
                f"version {FORMAT_VERSION}: upgrade prunekit"
            )
        if length > min(_MAX_HEADER, len(self.data) - _PREAMBLE.size):
            raise self.fail(f"header length {length} exceeds the file")
        self.header_length = length
        try:
            header = json.loads(bytes(self.data[_PREAMBLE.size : _PREAMBLE.size + length]).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self.fail(f"unreadable header ({err})") from None
        if not isinstance(header, dict) or header.get("format") != "prunekit.sparse":
            raise self.fail("the header does not describe a prunekit.sparse file")
        if header.get("byteorder") != "little" or sys.byteorder != "little":
            raise ValueError(f"{self.name!r}: only little-endian files on little-endian machines are supported")
        if not isinstance(header.get("entries"), list):
            raise self.fail("the header has no entry list")
        return header

    def blob(self, blob: Any) -> bytes:
        try:
            offset, length, codec, size, crc = (
                int(blob["offset"]), int(blob["length"]), blob["codec"], int(blob["size"]), int(blob["crc32"])
            )  # fmt: skip
        except (TypeError, KeyError, ValueError):
            raise self.fail(f"malformed blob description {blob!r}") from None
        end = self.start + offset + length
        if offset < 0 or length < 0 or size < 0 or end > len(self.data):
            raise self.fail("a blob lies outside the file (truncated?)")
        stored = bytes(self.data[self.start + offset : end])
        if zlib.crc32(stored) != crc:
            raise self.fail("a blob's CRC-32 does not match (corrupted bytes)")
        # Decompress at most the announced size: a crafted blob cannot exhaust memory.
        if codec == "raw":
            raw = stored
        elif codec == "zlib":
            try:
                raw = zlib.decompressobj().decompress(stored, size + 1)
            except zlib.error as err:
                raise self.fail(f"bad zlib data ({err})") from None
        elif codec == "lzma":
            try:
                raw = lzma.LZMADecompressor().decompress(stored, size + 1)
            except lzma.LZMAError as err:
                raise self.fail(f"bad LZMA data ({err})") from None
        else:
            raise self.fail(f"unknown codec {codec!r}")
        if len(raw) != size:
            raise self.fail(f"a blob decodes to {len(raw)} bytes, expected {size}")
        return raw


def _dtype(reader: _Reader, name: Any) -> torch.dtype:
    if name not in _DTYPES:
        raise reader.fail(f"unknown dtype {name!r}")
    return _DTYPES[name]


def _decode_tensor(reader: _Reader, entry: Mapping[str, Any]) -> Tensor:
    key = entry.get("key")
    dtype = _dtype(reader, entry.get("dtype"))
    stored_dtype = _dtype(reader, entry.get("stored_dtype"))
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise reader.fail(f"bad shape {shape!r} for {key!r}")
    numel = math.prod(shape)
    width = torch.empty((), dtype=dtype).element_size()
    stored_width = torch.empty((), dtype=stored_dtype).element_size()
    if stored_dtype != dtype and not (stored_dtype in _LOSSY_DTYPES and dtype in (torch.float32, torch.float64)):
        raise reader.fail(f"{key!r} stores {stored_dtype} values for a {dtype} tensor")
    blobs = entry.get("blobs")
    sparse = entry.get("encoding") == "sparse"
    if not isinstance(blobs, dict) or entry.get("encoding") not in ("sparse", "dense"):
        raise reader.fail(f"bad encoding for {key!r}")
    count = numel
    if sparse:
        bits = np.frombuffer(reader.blob(blobs.get("mask")), dtype=np.uint8)
        if bits.size != (numel + 7) // 8:
            raise reader.fail(f"the mask of {key!r} has the wrong size")
        nonzero = np.unpackbits(bits, count=numel).astype(bool)
        count = int(nonzero.sum())
        if count != entry.get("nnz"):
            raise reader.fail(f"the mask of {key!r} does not match its non-zero count")
    planes = blobs.get("planes")
    if not isinstance(planes, list) or len(planes) != stored_width:
        raise reader.fail(f"{key!r} should have {stored_width} byte planes")
    # Check the planes against the header before allocating anything from its
    # numbers: a crafted shape must not make us reserve terabytes.
    arrays = []
    for blob in planes:
        plane = np.frombuffer(reader.blob(blob), dtype=np.uint8)
        if plane.size != count:
            raise reader.fail(f"a byte plane of {key!r} has {plane.size} bytes, expected {count}")
        arrays.append(plane)
    values = np.stack(arrays, axis=1) if arrays else np.empty((count, 0), dtype=np.uint8)
    if stored_dtype != dtype:
        widened = torch.from_numpy(values.reshape(-1)).view(stored_dtype).to(dtype)
        values = widened.view(torch.uint8).numpy().reshape(count, width)
    if sparse:
        rows = np.zeros((numel, width), dtype=np.uint8)
        rows[nonzero] = values
        if "zero_signs" in blobs:
            signs = np.frombuffer(reader.blob(blobs["zero_signs"]), dtype=np.uint8)
            zeros = numel - count
            if signs.size != (zeros + 7) // 8 or dtype not in _REAL_FLOATS:
                raise reader.fail(f"the zero signs of {key!r} have the wrong size")
            negative = np.unpackbits(signs, count=zeros).astype(bool)
            rows[np.flatnonzero(~nonzero)[negative], -1] = 0x80
    else:
        rows = values
    flat = torch.from_numpy(np.ascontiguousarray(rows).reshape(-1))
    if dtype == torch.bool:
        return flat.view(torch.bool).reshape(shape)
    return flat.view(dtype).reshape(shape)


def read_sparse_header(path: PathLike) -> Dict[str, Any]:
    """The JSON header of a sparse checkpoint: ``lossy``, ``values_dtype``, and each entry's encoding.

    Example:
        >>> read_sparse_header("model.pksparse")["lossy"]  # doctest: +SKIP
        False
    """
    return _Reader(path).header


def _check_fits(model: nn.Module, state: Mapping[str, Any], name: str) -> None:
    """Compare keys and shapes first, so a mismatch leaves the model untouched."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and isinstance(v, Tensor) and isinstance(state[k], Tensor) and v.shape != state[k].shape
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


def load_sparse(path: PathLike, model: Optional[nn.Module] = None) -> Union["OrderedDict[str, Any]", nn.Module]:
    """Read a :func:`save_sparse` file: its state_dict, or ``model`` with it loaded (strict).

    Only JSON and raw bytes are parsed, so an untrusted file cannot run code.

    Args:
        path: the file.
        model: when given, the state_dict is loaded into it (every key and shape must
            match; on mismatch nothing is loaded) and the model is returned.

    Returns:
        The state_dict (an ``OrderedDict`` of CPU tensors with torch's ``_metadata``),
        or ``model``.

    Raises:
        ValueError: not a prunekit sparse checkpoint, a damaged one, or one that does
            not fit ``model``.

    Example:
        >>> state = load_sparse("model.pksparse")  # doctest: +SKIP
        >>> model = load_sparse("model.pksparse", model)  # doctest: +SKIP
    """
    reader = _Reader(path)
    state: "OrderedDict[str, Any]" = OrderedDict()
    for entry in reader.header["entries"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            raise reader.fail("malformed entry")
        if entry.get("type") == "tensor":
            state[entry["key"]] = _decode_tensor(reader, entry)
        elif entry.get("type") == "json":
            state[entry["key"]] = entry.get("value")
        else:
            raise reader.fail(f"unknown entry type {entry.get('type')!r}")
    metadata = reader.header.get("metadata")
    if isinstance(metadata, dict):
        state._metadata = OrderedDict((k, dict(v)) for k, v in metadata.items())  # type: ignore[attr-defined]
    if model is None:
        return state
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_fits(model, state, reader.name)
    model.load_state_dict(state, strict=True)
    return model
