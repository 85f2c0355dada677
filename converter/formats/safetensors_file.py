"""One safetensors file, written as the engine needs it: its header first, its bytes later.

A safetensors file is an 8-byte little-endian length ``N``, ``N`` bytes of JSON header, then the
tensors' bytes back to back; the header gives each tensor's dtype, shape and byte range from
the start of the data. The header is written as ``safetensors.torch.save_file`` writes it
(compact JSON, ``__metadata__`` first, the tensors in the order given, padded with spaces to a
multiple of 8), and the Hugging Face format gives the tensors in save_file's order (widest dtype
first, then by name): a filled file is then byte for byte what save_file writes from the same
tensors, and every tensor starts aligned. The file is extended to its full size at once; its data
is a hole until the engine writes it.

Reading back goes through safetensors' own ``safe_open``, as transformers, torchtune and
torchtitan's ``HuggingFaceStorageReader`` read the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from converter.formats.base import check_loaded
from converter.plan import OutputTensor

METADATA = {"format": "pt"}  # what transformers' save_pretrained writes, and expects
_LENGTH = struct.Struct("<Q")
_ALIGN = 8
# The dtypes safetensors knows for torch tensors, by their name in the header, in the order of
# its Rust ``Dtype`` enum: ``save_file`` writes the tensors of later dtypes first.
DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.float32: "F32",
    torch.complex64: "C64",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.uint64: "U64",
}
_RANK = {dtype: i for i, dtype in enumerate(DTYPES)}


def nbytes(tensor: OutputTensor) -> int:
    n = tensor.dtype.itemsize
    for s in tensor.shape:
        n *= s
    return n


def save_file_order(tensors: list[OutputTensor]) -> list[OutputTensor]:
    """``tensors`` in the order ``safetensors.torch.save_file`` puts them in a file."""
    return sorted(tensors, key=lambda t: (-_RANK[t.dtype], t.name))


def header(tensors: list[OutputTensor]) -> tuple[bytes, dict[str, int]]:
    """The file's first bytes (length and padded JSON header) for ``tensors`` in this order,
    and the byte offset in the file of each tensor's data."""
    entries: dict[str, object] = {"__metadata__": METADATA}
    begin = 0
    ranges = {}
    for t in tensors:
        end = begin + nbytes(t)
        entries[t.name] = {
            "dtype": DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [begin, end],
        }
        ranges[t.name] = begin
        begin = end
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % _ALIGN)
    start = _LENGTH.size + len(text)
    return _LENGTH.pack(len(text)) + text, {name: start + b for name, b in ranges.items()}


def create(path: Path, tensors: list[OutputTensor]) -> dict[str, int]:
    """Writes the header of a file of ``tensors`` (in this order) at ``path`` and extends the
    file to its full size; returns where each tensor's bytes go."""
    head, offsets = header(tensors)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + sum(nbytes(t) for t in tensors))
    return offsets


def read_back(path: Path, tensors: list[OutputTensor]) -> dict[str, int]:
    """Opens the file with ``safe_open`` as its consumers do, checks that it holds ``tensors``
    (names, dtypes, shapes, metadata), and returns where each tensor's bytes lie in the file.
    Raises ValueError with what differs.

    safe_open accepts a header only if its byte ranges are back to back and cover the data to
    the file's end, each as long as its dtype and shape say: the ranges it accepted are where
    it maps each tensor's bytes. The tensors are taken as slices, which read the header only
    (a tensor from ``get_tensor`` costs a storage each, thousands for a mixture-of-experts
    model's experts), but for one tensor of each dtype, which gives the torch dtype that the
    header's name loads as."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata()
            names = set(f.keys())
            slices = {t.name: f.get_slice(t.name) for t in tensors if t.name in names}
            one_of = {s.get_dtype(): n for n, s in slices.items()}
            loads_as = {dtype: f.get_tensor(n).dtype for dtype, n in one_of.items()}
            loaded = {n: (tuple(s.get_shape()), loads_as[s.get_dtype()]) for n, s in slices.items()}
    except Exception as e:
        raise ValueError(f"it does not open with safetensors' safe_open: {e}") from e
    if metadata != METADATA:
        raise ValueError(f"its header metadata is {metadata}, expected {METADATA}")
    planned = {t.name for t in tensors}
    if names != planned:
        raise ValueError(
            "its keys differ from the planned ones: missing "
            f"{sorted(planned - names)}, unexpected {sorted(names - planned)}"
        )
    check_loaded(loaded, tensors)
    with open(path, "rb") as f:
        (length,) = _LENGTH.unpack(f.read(_LENGTH.size))
        entries = json.loads(f.read(length))
    data = _LENGTH.size + length
    return {t.name: data + entries[t.name]["data_offsets"][0] for t in tensors}
