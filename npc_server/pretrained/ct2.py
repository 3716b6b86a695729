"""Reader (and a small writer, for tests) of CTranslate2 `model.bin` files, without the ctranslate2 package.

The format (binary version 6, little endian) is a header and a flat list of named tensors:

    u32 version | str spec_name | u32 revision | u32 n_variables
    n_variables x ( str name | u8 ndim | ndim x u32 dim | u8 dtype | u32 n_bytes | n_bytes of data )
    u32 n_aliases | n_aliases x ( str alias | str target )

where `str` is u16 length (including a trailing NUL) + UTF-8 bytes + NUL. Scalars (ndim 0) hold one value.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

# CTranslate2's DataType enum.
DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
BFLOAT16 = 5
SUPPORTED_VERSIONS = (5, 6)


class CT2FormatError(ValueError):
    """The file is not a CTranslate2 model.bin this reader understands (truncated, wrong version, ...)."""


@dataclass
class CT2Model:
    spec: str
    revision: int
    variables: dict[str, np.ndarray] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> np.ndarray:
        name = self.aliases.get(name, name)
        if name not in self.variables:
            raise KeyError(f"{self.spec} model has no variable {name!r}")
        return self.variables[name]


class _Reader:
    def __init__(self, f: BinaryIO, path: str):
        self.f, self.path = f, path

    def take(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise CT2FormatError(f"{self.path}: truncated CTranslate2 file (wanted {n} more bytes, got {len(b)})")
        return b

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def string(self) -> str:
        n = self.u16()
        raw = self.take(n)
        if n == 0 or raw[-1] != 0:
            raise CT2FormatError(f"{self.path}: malformed string in CTranslate2 header")
        return raw[:-1].decode("utf-8")


def read_ct2(path: str | Path, prefix: str | None = None) -> CT2Model:
    """Read a model.bin; with `prefix` (e.g. "encoder/") keep only variables whose name starts with it."""
    path = Path(path)
    with open(path, "rb") as f:
        r = _Reader(f, str(path))
        version = r.u32()
        if version not in SUPPORTED_VERSIONS:
            raise CT2FormatError(f"{path}: CTranslate2 binary version {version} is not supported ({SUPPORTED_VERSIONS})")
        model = CT2Model(spec=r.string(), revision=r.u32())
        for _ in range(r.u32()):
            name = r.string()
            shape = tuple(r.u32() for _ in range(r.u8()))
            dtype_id = r.u8()
            n_bytes = r.u32()
            if prefix is not None and not name.startswith(prefix):
                f.seek(n_bytes, 1)
                continue
            raw = r.take(n_bytes)
            if dtype_id == BFLOAT16:
                bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
                arr = bits.view(np.float32)
            elif dtype_id in DTYPES:
                arr = np.frombuffer(raw, dtype=DTYPES[dtype_id])
            else:
                raise CT2FormatError(f"{path}: variable {name!r} has unknown dtype id {dtype_id}")
            if arr.size != int(np.prod(shape, dtype=np.int64)):
                raise CT2FormatError(f"{path}: variable {name!r} has {arr.size} values for shape {shape}")
            model.variables[name] = arr.reshape(shape).copy()
        for _ in range(r.u32()):
            alias = r.string()
            model.aliases[alias] = r.string()
        if f.read(1):
            raise CT2FormatError(f"{path}: trailing bytes after the CTranslate2 alias table")
    return model


def write_ct2(path: str | Path, spec: str, variables: dict[str, np.ndarray], revision: int = 1,
              aliases: dict[str, str] | None = None) -> None:
    """Write a model.bin (version 6) with float32/float16/int8/int16/int32 variables; used to make test files."""
    codes = {np.dtype(v): k for k, v in DTYPES.items()}

    def string(s: str) -> bytes:
        b = s.encode("utf-8") + b"\0"
        return struct.pack("<H", len(b)) + b

    with open(path, "wb") as f:
        f.write(struct.pack("<I", 6) + string(spec) + struct.pack("<I", revision) + struct.pack("<I", len(variables)))
        for name, value in variables.items():
            value = np.ascontiguousarray(value)
            if value.dtype not in codes:
                raise TypeError(f"{name}: dtype {value.dtype} cannot be written")
            f.write(string(name) + struct.pack("<B", value.ndim) + b"".join(struct.pack("<I", d) for d in value.shape))
            f.write(struct.pack("<B", codes[value.dtype]) + struct.pack("<I", value.nbytes) + value.tobytes())
        aliases = aliases or {}
        f.write(struct.pack("<I", len(aliases)))
        for a, t in aliases.items():
            f.write(string(a) + string(t))
