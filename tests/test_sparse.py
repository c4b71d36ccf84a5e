"""prunekit.sparse: exact round trip, size that follows sparsity, safe loading."""

import io
import json
import os
import pickle
import struct
import zlib
from collections import OrderedDict

import pytest
import torch
from torch import nn

import prunekit
from prunekit.io.sparse import MAGIC, SparseFormatError, load_sparse, read_sparse_header, save_sparse


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes, so -0.0 != 0.0 and NaN payloads count."""
    flat = tensor.reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    return flat.view(torch.uint8)


def assert_bitwise_equal(expected, actual):
    assert sorted(expected) == sorted(actual)
    for key, value in expected.items():
        other = actual[key]
        if isinstance(value, torch.Tensor):
            assert other.dtype == value.dtype and other.shape == value.shape, key
            assert torch.equal(bits(value), bits(other)), key
        else:
            assert other == value and type(other) is type(value), key


def pruned_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3)
    )
    prunekit.apply_plan(model, {"0": 0.5, "3": 0.9, "5": 0.8})
    return prunekit.finalize(model)


def test_pruned_model_round_trips_bit_for_bit_including_negative_zeros(tmp_path):
    model = pruned_model()
    state = model.state_dict()
    weight = state["3.weight"]
    weight[0, 0, 0, 0] = -0.0  # a user's tensor may hold -0.0: its sign must survive
    assert bool(((weight == 0) & torch.signbit(weight)).any())
    save_sparse(model, tmp_path / "m.pks")
    loaded = load_sparse(tmp_path / "m.pks")
    assert_bitwise_equal(state, loaded)
    assert list(loaded) == list(state) and loaded._metadata == state._metadata


def test_every_dtype_and_shape_round_trips(tmp_path):
    torch.manual_seed(0)
    sparse_float = torch.randn(300) * (torch.rand(300) > 0.8)
    sparse_float[:3] = torch.tensor([-0.0, float("nan"), float("-inf")])
    nan_payload = torch.tensor([0x7FC00123, 0, 0], dtype=torch.int32).view(torch.float32)
    state = OrderedDict(
        f32=sparse_float,
        f64=sparse_float.double(),
        f16=sparse_float.half(),
        bf16=sparse_float.bfloat16(),
        nan_payload=nan_payload,
        c64=torch.complex(sparse_float, -sparse_float),
        i64=torch.randint(-3, 3, (10, 10)),
        i8=torch.randint(-3, 3, (100,), dtype=torch.int8),
        u8=torch.randint(0, 2, (100,), dtype=torch.uint8),
        flag=torch.rand(200) > 0.9,
        scalar=torch.tensor(7),
        empty=torch.empty(0, 3),
        all_zero=torch.zeros(4, 100),
        extra={"epoch": 3, "name": "x", "ratios": [0.5, 1.0], "none": None},
    )
    save_sparse(state, tmp_path / "d.pks")
    assert_bitwise_equal(state, load_sparse(tmp_path / "d.pks"))


def test_file_size_follows_sparsity(tmp_path):
    torch.manual_seed(0)
    sizes = []
    for sparsity in (0.0, 0.5, 0.9, 0.99):
        layer = nn.Linear(256, 256)
        prunekit.fine_grained_l1(layer, "weight", amount=sparsity)
        prune_free = prunekit.finalize(layer)
        save_sparse(prune_free, tmp_path / f"{sparsity}.pks")
        sizes.append(os.path.getsize(tmp_path / f"{sparsity}.pks"))
    assert sizes == sorted(sizes, reverse=True)
    buffer = io.BytesIO()
    torch.save(prune_free.state_dict(), buffer)
    assert buffer.tell() / sizes[2] > 5  # 90% zeros: the mask and 10% of the values


def test_load_into_model_is_strict_and_returns_it(tmp_path):
    model = pruned_model()
    save_sparse(model, tmp_path / "m.pks")
    fresh = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3)
    )
    assert load_sparse(tmp_path / "m.pks", fresh) is fresh
    assert_bitwise_equal(model.state_dict(), fresh.state_dict())


def test_mismatched_model_is_refused_and_left_unchanged(tmp_path):
    save_sparse(pruned_model(), tmp_path / "m.pks")
    other = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3), nn.ReLU(), nn.Conv2d(8, 32, 3)
    )
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="3.weight.*unchanged"):
        load_sparse(tmp_path / "m.pks", other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_masked_target_model_gets_a_finalize_hint(tmp_path):
    save_sparse(pruned_model(), tmp_path / "m.pks")
    masked = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3)
    )
    prunekit.apply_plan(masked, {"3": 0.5})
    with pytest.raises(ValueError, match="finalize"):
        load_sparse(tmp_path / "m.pks", masked)


class Evil:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Evil(marker)))
    torch.save({"weight": Evil(marker)}, tmp_path / "evil.pt")
    for name in ("evil.pkl", "evil.pt"):
        with pytest.raises(ValueError, match="not a prunekit sparse checkpoint"):
            load_sparse(tmp_path / name)
    assert not marker.exists()


def _rewrite(path, edit):
    """Re-encode a file's header after ``edit(header)``, with a valid header CRC (what an attacker can do)."""
    data = path.read_bytes()
    _, version, length, _ = struct.unpack("<8sIQI", data[:24])
    header = json.loads(data[24 : 24 + length])
    payload = edit(header) or data[24 + length :]
    header["payload_bytes"] = len(payload)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<8sIQI", MAGIC, version, len(encoded), zlib.crc32(encoded)) + encoded + payload)


def test_pickle_inside_a_valid_file_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    save_sparse({"w": torch.zeros(200, dtype=torch.uint8)}, tmp_path / "m.pks")
    evil = pickle.dumps(Evil(marker))

    def smuggle(header):
        header["entries"][0]["encoding"] = "dense"
        header["entries"][0]["nnz"] = 200
        header["entries"][0]["blobs"] = {
            "planes": [{"offset": 0, "length": len(evil), "codec": "raw", "size": len(evil), "crc32": zlib.crc32(evil)}]
        }
        return evil

    _rewrite(tmp_path / "m.pks", smuggle)
    with pytest.raises(SparseFormatError, match="damaged"):
        load_sparse(tmp_path / "m.pks")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_damaged_file_gives_a_clear_error(tmp_path, damage):
    save_sparse(pruned_model(), tmp_path / "m.pks")
    data = bytearray((tmp_path / "m.pks").read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "flip":
        data[-50] ^= 0xFF
    else:
        data = bytearray()
    (tmp_path / "m.pks").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sparse checkpoint"):
        load_sparse(tmp_path / "m.pks")


def test_float16_values_are_lossy_smaller_and_labelled(tmp_path):
    model = pruned_model()
    save_sparse(model, tmp_path / "exact.pks")
    save_sparse(model, tmp_path / "half.pks", values_dtype=torch.float16)
    header = read_sparse_header(tmp_path / "half.pks")
    assert header["lossy"] is True and header["values_dtype"] == "float16"
    assert read_sparse_header(tmp_path / "exact.pks")["lossy"] is False
    assert os.path.getsize(tmp_path / "half.pks") < 0.7 * os.path.getsize(tmp_path / "exact.pks")
    loaded = load_sparse(tmp_path / "half.pks")
    for key, value in model.state_dict().items():
        assert loaded[key].dtype == value.dtype
        if value.is_floating_point():
            assert torch.equal(loaded[key] == 0, value == 0), key  # the zeros are exact
            assert torch.allclose(loaded[key], value, rtol=1e-3, atol=1e-4), key


def test_float16_overflow_is_refused(tmp_path):
    with pytest.raises(ValueError, match="bfloat16"):
        save_sparse({"w": torch.tensor([1e6, 0.0])}, tmp_path / "x.pks", values_dtype=torch.float16)
    assert not (tmp_path / "x.pks").exists()


def test_unsupported_values_are_refused_and_old_file_kept(tmp_path):
    save_sparse({"w": torch.ones(3)}, tmp_path / "m.pks")
    original = (tmp_path / "m.pks").read_bytes()
    with pytest.raises(TypeError, match="'extra'"):
        save_sparse({"w": torch.zeros(3), "extra": (1, 2)}, tmp_path / "m.pks")
    with pytest.raises(ValueError, match="values_dtype"):
        save_sparse({"w": torch.zeros(3)}, tmp_path / "m.pks", values_dtype=torch.int8)
    assert (tmp_path / "m.pks").read_bytes() == original


def test_saving_a_masked_model_warns_to_finalize(tmp_path):
    model = prunekit.apply_plan(nn.Sequential(nn.Conv2d(3, 8, 3)), {"0": 0.5})
    with pytest.warns(UserWarning, match="finalize"):
        save_sparse(model, tmp_path / "m.pks")
    assert_bitwise_equal(model.state_dict(), load_sparse(tmp_path / "m.pks"))


@pytest.mark.parametrize("shape", [[10**12], [True]])
def test_crafted_header_shape_is_refused_before_allocating(tmp_path, shape):
    plane = {"offset": 0, "length": 0, "codec": "raw", "size": 0, "crc32": 0}
    entry = {
        "key": "x", "type": "tensor", "dtype": "float32", "stored_dtype": "float32", "shape": shape,
        "encoding": "dense", "nnz": 1, "blobs": {"planes": [plane] * 4},
    }
    header = json.dumps({
        "format": "prunekit.sparse", "version": 1, "lossy": False, "values_dtype": None,
        "byteorder": "little", "payload_bytes": 0, "metadata": None, "entries": [entry],
    }).encode()
    (tmp_path / "c.pks").write_bytes(struct.pack("<8sIQ", MAGIC, 1, len(header)) + header)
    with pytest.raises(ValueError, match="damaged"):
        load_sparse(tmp_path / "c.pks")
