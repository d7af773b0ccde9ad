"""A GGUF file's metadata and tensor table, read in one pass over its header; tensor data stays memory-mapped.

    magic "GGUF" | version u32 | tensor count u64 | key-value count u64
    key-value:   key (u64 length + UTF-8) | value type u32 | value (an array: element type u32, count u64, items)
    tensor info: name | dims u32 + dims u64[] (fastest first) | ggml type u32 | offset u64 from the data start
    data:        at the first multiple of general.alignment (32) after the header

gguf.GGUFReader builds a numpy view for every part of every value: for SmolLM2's 49k-token vocabulary and 48k
merges that is ~150k views and 1.5-3 s on this CPU. Here numeric arrays are one np.frombuffer view each and
string arrays are decoded by one loop of struct reads (~0.05 s), which is all the loader and the tokenizer need.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF value types -> (struct format, numpy dtype); 8 is a string, 9 an array.
_SCALARS = {0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
            4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
            10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64)}
_STRING, _ARRAY = 8, 9
# ggml types stored one element per item (not in blocks), and their numpy dtypes.
_PLAIN_TENSOR_TYPES = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64,
                       28: np.float64}


@dataclass
class GGUFTensor:
    """One tensor's entry: `shape` in ggml order (fastest dimension first), as GGUFReader gives it; `data` a view
    of the file, rows first (HF order), and for block-quantized types the bytes of each row's blocks."""
    name: str
    tensor_type: int  # a gguf.GGMLQuantizationType value
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass
class StringArray:
    """A string array read without decoding its strings (read_gguf_file(decode_strings=False)): its length."""
    count: int

    def __len__(self) -> int:
        return self.count


@dataclass
class GGUFFile:
    path: str
    metadata: dict[str, Any]  # scalars as Python values, string arrays as lists, numeric arrays as numpy views
    tensors: dict[str, GGUFTensor]  # in file order


class _Cursor:
    def __init__(self, buffer: memoryview, path: str, decode_strings: bool) -> None:
        self.buffer, self.path, self.offset, self.decode_strings = buffer, path, 0, decode_strings

    def scalar(self, fmt: str):
        value, = struct.unpack_from(fmt, self.buffer, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        start = self.offset
        self.offset += length
        return bytes(self.buffer[start:self.offset]).decode("utf-8", errors="replace")

    def value(self, value_type: int):
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            return self.array()
        if value_type not in _SCALARS:
            raise ValueError(f"GGUF file {self.path!r}: unknown value type {value_type} at byte {self.offset}")
        return self.scalar(_SCALARS[value_type][0])

    def array(self):
        item_type, count = self.scalar("<I"), self.scalar("<Q")
        if item_type in _SCALARS:
            dtype = np.dtype(_SCALARS[item_type][1])
            values = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.offset)
            self.offset += count * dtype.itemsize
            return values
        if item_type == _STRING:
            return self._strings(count) if self.decode_strings else self._skip_strings(count)
        return [self.value(item_type) for _ in range(count)]

    def _skip_strings(self, count: int) -> StringArray:
        buffer, offset, unpack = self.buffer, self.offset, struct.Struct("<Q").unpack_from
        for _ in range(count):
            offset += 8 + unpack(buffer, offset)[0]
        self.offset = offset
        return StringArray(count)

    def _strings(self, count: int) -> list[str]:
        buffer, offset, unpack = self.buffer, self.offset, struct.Struct("<Q").unpack_from
        strings = []
        append = strings.append
        for _ in range(count):
            length, = unpack(buffer, offset)
            offset += 8
            append(str(buffer[offset:offset + length], "utf-8", "replace"))
            offset += length
        self.offset = offset
        return strings


def read_gguf_file(path: str, decode_strings: bool = True) -> GGUFFile:
    """The metadata and tensors of the GGUF file at `path` (little-endian, version 2 or 3). decode_strings=False:
    string arrays (the vocabulary, the merges) become StringArray lengths, which is all a model load needs."""
    data = np.memmap(path, mode="r", dtype=np.uint8)
    cursor = _Cursor(memoryview(data), path, decode_strings)
    if bytes(cursor.buffer[:4]) != GGUF_MAGIC:
        raise ValueError(f"{path!r} is not a GGUF file (it does not start with 'GGUF')")
    cursor.offset = 4
    version = cursor.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF file {path!r} has version {version}; supported: 2 and 3 (little-endian)")
    tensor_count, kv_count = cursor.scalar("<Q"), cursor.scalar("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.scalar("<I"))
    infos = []
    for _ in range(tensor_count):
        name = cursor.string()
        dims = tuple(cursor.scalar("<Q") for _ in range(cursor.scalar("<I")))
        infos.append((name, dims, cursor.scalar("<I"), cursor.scalar("<Q")))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-cursor.offset // alignment) * alignment
    plain = data.view(np.ndarray)  # slices of a np.memmap run Python code each; of its ndarray view they don't
    tensors = {}
    for name, dims, tensor_type, offset in infos:
        if name in tensors:
            raise ValueError(f"GGUF file {path!r} holds tensor {name!r} twice")
        tensors[name] = GGUFTensor(name, tensor_type, dims,
                                   _tensor_data(plain, data_start + offset, dims, tensor_type, path, name))
    return GGUFFile(path, metadata, tensors)


def _tensor_data(data: np.ndarray, start: int, dims: tuple[int, ...], tensor_type: int, path: str,
                 name: str) -> np.ndarray:
    import gguf  # its type table only; imported here so that reading a header needs nothing but numpy

    rows_shape = tuple(reversed(dims[1:]))
    if tensor_type in _PLAIN_TENSOR_TYPES:
        dtype = np.dtype(_PLAIN_TENSOR_TYPES[tensor_type])
        count = int(np.prod(dims))
        return data[start:start + count * dtype.itemsize].view(dtype).reshape(*rows_shape, dims[0])
    try:
        block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(tensor_type)]
    except (ValueError, KeyError) as error:
        raise ValueError(f"GGUF file {path!r}: tensor {name!r} has unknown ggml type {tensor_type}") from error
    if dims[0] % block_size:
        raise ValueError(f"GGUF file {path!r}: tensor {name!r} rows of {dims[0]} are not whole blocks of "
                         f"{block_size}")
    row_bytes = dims[0] // block_size * type_size
    count = int(np.prod(rows_shape, dtype=np.int64)) * row_bytes
    return data[start:start + count].reshape(*rows_shape, row_bytes)
