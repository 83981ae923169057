"""The safetensors reader/writer: bit-exact round trip, interoperable, hostile headers refused."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from mmnb import safetensors_format as sf


def test_round_trip_every_dtype_and_metadata(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "f16": torch.randn(2, 2, generator=g).half(),
        "i64": torch.arange(6).view(2, 3),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "mask": torch.tensor([True, False]),
    }
    size = sf.write(tmp_path / "t.safetensors", tensors, {"run": "a", "step": "3"})
    assert size == (tmp_path / "t.safetensors").stat().st_size
    back, meta = sf.read(tmp_path / "t.safetensors")
    assert list(back) == list(tensors) and meta == {"run": "a", "step": "3"}
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    st = pytest.importorskip("safetensors.torch")  # the reference implementation agrees
    ref = st.load_file(tmp_path / "t.safetensors")
    assert all(torch.equal(ref[k], tensors[k]) for k in tensors)


def _file(tmp_path, header: dict, data: bytes = b"") -> str:
    blob = json.dumps(header).encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return str(path)


@pytest.mark.parametrize(
    "header, data, message",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "data section"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "do not fit"),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            },
            b"\0" * 4,
            "does not start where",
        ),
        ({"a": {"dtype": "PYOBJ", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "malformed"),
        ({"__metadata__": {"k": 1}}, b"", "strings to strings"),
    ],
)
def test_malformed_headers_are_refused_naming_the_file(tmp_path, header, data, message):
    path = _file(tmp_path, header, data)
    with pytest.raises(sf.SafetensorsError, match=message) as err:
        sf.read(path)
    assert path in str(err.value)


def test_header_length_past_the_end(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(sf.SafetensorsError, match="exceeds the file"):
        sf.read(path)
