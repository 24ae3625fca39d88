"""The safetensors file format, written and read without the ``safetensors`` package.

The format is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the raw little-endian bytes. It holds tensors only, so a
file cannot run code when read, and Hugging Face's and timm's loaders read it directly. The
writer lays a file out as the reference implementation does (widest dtypes first, then by
name; the header padded with spaces to a multiple of 8 bytes), so each tensor is aligned.
"""

from __future__ import annotations

import json
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import torch

from jigsawdata.errors import InputError
from jigsawdata.files import write_bytes_atomic

SUFFIX = ".safetensors"
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_NAMES = {name: dtype for dtype, name in _DTYPES.items()}
_MAX_HEADER = 100 << 20


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def safetensors_bytes(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """A state dict as the bytes of a ``.safetensors`` file."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    chunks, offset = [], 0
    for name in sorted(state, key=lambda n: (-state[n].element_size(), n)):  # widest dtypes first: aligned
        tensor = state[name]
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"{name}: dtype {tensor.dtype} has no safetensors name")
        data = _raw(tensor)
        header[name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def write_safetensors(path: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    write_bytes_atomic(Path(path), safetensors_bytes(state, metadata))


def read_safetensors(path: Path) -> "OrderedDict[str, torch.Tensor]":
    """The tensors of a ``.safetensors`` file; a malformed one is an :class:`InputError`."""
    data = Path(path).read_bytes()
    try:
        (length,) = struct.unpack("<Q", data[:8])
        if length > min(_MAX_HEADER, len(data) - 8):
            raise ValueError(f"a header of {length} bytes in a file of {len(data)}")
        header = json.loads(data[8 : 8 + length])
        body = memoryview(data)[8 + length :]
        state, end = OrderedDict(), 0
        for name, info in sorted(
            ((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda item: item[1]["data_offsets"][0]
        ):
            start, stop = info["data_offsets"]
            dtype, shape = _NAMES[info["dtype"]], [int(n) for n in info["shape"]]
            if start != end or stop > len(body):
                raise ValueError(f"{name}: bytes {start}..{stop} do not follow the previous tensor inside the file")
            if stop == start:
                state[name] = torch.empty(shape, dtype=dtype)
            else:
                state[name] = (
                    torch.frombuffer(bytearray(body[start:stop]), dtype=torch.uint8).view(dtype).reshape(shape)
                )
            end = stop
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
        raise InputError(f"{path} is not a readable safetensors file ({exc})") from exc
    return OrderedDict(sorted(state.items()))
