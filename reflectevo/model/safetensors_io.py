"""Read safetensors files memory-mapped (no copy until a tensor is cast or moved) and write them atomically.

Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import torch

from reflectevo.errors import ModelLoadError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """{name: tensor} backed by a private (copy-on-write) memory map of ``path``."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot open ({e.strerror})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ModelLoadError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8 or header_len > 100_000_000:
            raise ModelLoadError(f"{path}: corrupt safetensors header (length {header_len}, file {size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelLoadError(f"{path}: corrupt safetensors header (invalid JSON)") from None
        base = 8 + header_len
        try:  # {name: (dtype, shape, (start, end))}; valid JSON of another shape is a corrupt header too
            entries = {k: (v.get("dtype"), [int(d) for d in v["shape"]], tuple(int(o) for o in v["data_offsets"]))
                       for k, v in header.items() if k != "__metadata__"}
            if any(len(off) != 2 for _, _, off in entries.values()):
                raise ValueError("data_offsets must be [start, end]")
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{path}: corrupt safetensors header ({type(e).__name__}: {e})") from None
        data_end = max((off[1] for _, _, off in entries.values()), default=0)
        if base + data_end > size:
            raise ModelLoadError(f"{path}: truncated safetensors file ({size} bytes, header needs {base + data_end})")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > base else None
    out = {}
    for name, (dtype_name, shape, (start, end)) in entries.items():
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            raise ModelLoadError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name!r}")
        count = 1
        for d in shape:
            count *= d
        if end - start != count * torch.tensor([], dtype=dtype).element_size():
            raise ModelLoadError(f"{path}: tensor {name!r} byte size does not match its shape {shape}")
        if count == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            out[name] = torch.frombuffer(buf, dtype=dtype, count=count, offset=base + start).view(shape)
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None):
    """Write atomically: a temporary file in the same folder, fsync, then rename over ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
