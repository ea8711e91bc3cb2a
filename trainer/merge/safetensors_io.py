"""Read and write safetensors files without materializing whole models.

Reading: the header is parsed and validated here (so a corrupt shard is a clear InvalidInput before any
output is written); tensor data is a zero-copy view of a read-only memory map, and the pages of a tensor
are handed back to the kernel (madvise DONTNEED) once it has been merged, so resident memory stays at
about one tensor per input instead of growing with the model.

Writing: all output shapes are known before the first byte is written, so each shard's header is laid
out up front and tensors are streamed into place one by one (one tensor in memory, never a shard).
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InvalidInput

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20  # the reference implementation refuses larger headers too
PAGE = mmap.PAGESIZE


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SafetensorsFile:
    """One .safetensors file: validated header, tensors as views of a read-only memory map."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict = {}
        self._mm: mmap.mmap | None = None
        self._fd: int | None = None
        self._parse_header()

    def _corrupt(self, why: str) -> InvalidInput:
        return InvalidInput(f"{self.path}: corrupt safetensors header: {why}")

    def _parse_header(self) -> None:
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) < 8:
                    raise self._corrupt(f"file is {size} bytes, shorter than the 8-byte length prefix")
                (n,) = struct.unpack("<Q", raw_len)
                if n > MAX_HEADER_BYTES or 8 + n > size:
                    raise self._corrupt(f"header length {n} does not fit in a {size}-byte file")
                raw = f.read(n)
        except OSError as err:
            raise InvalidInput(f"{self.path}: cannot read: {err}") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise self._corrupt(f"not JSON ({err})") from None
        if not isinstance(header, dict):
            raise self._corrupt("header is not a JSON object")
        data_start, data_len = 8 + n, size - 8 - n
        self.metadata = header.pop("__metadata__", None) or {}
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._corrupt(f"bad entry for tensor {name!r}: {entry!r}"[:300]) from None
            if any(d < 0 for d in shape) or not 0 <= begin <= end <= data_len:
                raise self._corrupt(f"tensor {name!r}: offsets {begin}..{end} outside the {data_len}-byte data")
            if end - begin != math.prod(shape) * itemsize(dtype):
                raise self._corrupt(f"tensor {name!r}: {end - begin} bytes for shape {list(shape)} {entry['dtype']}")
            self.tensors[name] = TensorInfo(dtype, shape, data_start + begin, end - begin)

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            self._fd = os.open(self.path, os.O_RDONLY)
            self._mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        return self._mm

    def view(self, name: str) -> torch.Tensor:
        """The tensor as a zero-copy, read-only view of the file (never write to it)."""
        info = self.tensors[name]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        mm = self._map()
        with warnings.catch_warnings():  # torch warns that the buffer is not writable: we only read it
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(mm, dtype=info.dtype, count=info.numel, offset=info.start)
        return flat.view(info.shape)

    def release(self, name: str, offset: int = 0, length: int | None = None) -> None:
        """Drop the tensor's pages (or ``length`` bytes from ``offset`` in it) from this process; they stay
        in the page cache and are read again on the next access."""
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        info = self.tensors[name]
        length = info.nbytes - offset if length is None else length
        start = ((info.start + offset) // PAGE) * PAGE
        end = min(len(self._mm), info.start + offset + length)
        if end > start:
            self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a tensor view is still alive; the map goes with it
                pass
            self._mm = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------------------------------------- writing

@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


def _header_bytes(tensors: list[OutTensor]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte aligned data, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


def plan_shards(tensors: list[OutTensor], max_shard_bytes: int) -> list[list[OutTensor]]:
    """Greedy, order-preserving split into shards of at most ``max_shard_bytes`` of tensor data
    (a tensor larger than that gets a shard of its own)."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardedWriter:
    """Streams tensors, in the planned order, into shards of a HF folder, then writes the index."""

    def __init__(self, folder: Path, tensors: list[OutTensor], max_shard_bytes: int):
        self.folder = Path(folder)
        self.shards = plan_shards(tensors, max_shard_bytes)
        self.names = shard_names(len(self.shards))
        self.order = [t for shard in self.shards for t in shard]
        self._next = 0
        self._shard = -1
        self._left_in_shard = 0
        self._file = None
        self.bytes_written = 0

    def _open_next_shard(self) -> None:
        self._close_file()
        self._shard += 1
        header = _header_bytes(self.shards[self._shard])
        self._file = open(self.folder / self.names[self._shard], "wb")
        self._file.write(header)
        self.bytes_written += len(header)
        self._left_in_shard = len(self.shards[self._shard])

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.write_blocks(name, [tensor])

    def write_blocks(self, name: str, blocks) -> None:
        """Write the next planned tensor from consecutive row blocks (or one block: the whole tensor)."""
        expected = self.order[self._next]
        if name != expected.name:
            raise RuntimeError(f"writer got {name}, planned {expected.name}")
        if self._left_in_shard == 0:
            self._open_next_shard()
        written = 0
        for block in blocks:
            if block.dtype != expected.dtype or tuple(block.shape[1:]) != expected.shape[1:]:
                raise RuntimeError(f"{name}: block {tuple(block.shape)} {block.dtype} does not fit "
                                   f"{expected.shape} {expected.dtype}")
            data = block.contiguous().view(-1)
            if data.numel():
                self._file.write(memoryview(data.view(torch.uint8).numpy()))
            written += data.numel() * data.element_size()
        if written != expected.nbytes:  # a short tensor would corrupt every offset after it
            raise RuntimeError(f"{name}: wrote {written} bytes, planned {expected.nbytes}")
        self.bytes_written += expected.nbytes
        self._next += 1
        self._left_in_shard -= 1

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def finish(self) -> list[str]:
        """Close the last shard and write the index (only for more than one shard, as HF does)."""
        if self._next != len(self.order):
            raise RuntimeError(f"writer finished after {self._next} of {len(self.order)} tensors")
        self._close_file()
        files = list(self.names)
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in self.order)},
                     "weight_map": {t.name: self.names[i] for i, shard in enumerate(self.shards) for t in shard}}
            raw = json.dumps(index, indent=2).encode()
            (self.folder / "model.safetensors.index.json").write_bytes(raw)
            self.bytes_written += len(raw)
            files.append("model.safetensors.index.json")
        return files

    def abort(self) -> None:
        self._close_file()
