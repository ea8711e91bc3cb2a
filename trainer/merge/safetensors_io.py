"""Read and write safetensors files without materializing whole models.

Reading: the header is parsed and validated here (so a corrupt shard is a clear InvalidInput before any
output is written); tensor data is a zero-copy view of a read-only memory map, and the pages of a tensor
are handed back to the kernel (madvise DONTNEED) once it has been merged, so resident memory stays at
about one tensor per input instead of growing with the model.

Writing: all output shapes are known before the first byte is written, so each shard's header is laid
out up front and every tensor has a fixed place in its shard: tensors are streamed there block by block,
by several threads at once, and hashed in order as they complete (one block per worker in memory, never a
tensor or a shard).
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
import mmap
import os
import struct
import threading
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
        self._lock = threading.Lock()
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
        with self._lock:  # merge workers may open the same shard at once
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


def planned_bytes(tensors: list[OutTensor], max_shard_bytes: int) -> int:
    """Bytes ``ShardedWriter`` will write for these tensors: every shard's header and data, and the index
    (written for more than one shard), exactly as laid out there."""
    shards = plan_shards(tensors, max_shard_bytes)
    total = sum(len(_header_bytes(shard)) + sum(t.nbytes for t in shard) for shard in shards)
    if len(shards) > 1:
        names = shard_names(len(shards))
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                 "weight_map": {t.name: names[i] for i, shard in enumerate(shards) for t in shard}}
        total += len(json.dumps(index, indent=2).encode())
    return total


@dataclass(frozen=True)
class Slot:
    """Where a planned tensor's bytes go: its shard and absolute offset there."""

    tensor: OutTensor
    shard: int
    offset: int


class ShardedWriter:
    """Writes planned tensors into the shards of a HF folder, each at its own place, then the index.

    Every header is laid out before any tensor is merged, so each tensor has a fixed place in its shard and
    tensors may be written in any order, by several threads at once (``pwrite``). ``seal`` is then called
    in the planned order: it hashes each shard as its bytes become complete (read back from the page
    cache, so the manifest need not read the output again) and starts the kernel's write-back early.
    """

    def __init__(self, folder: Path, tensors: list[OutTensor], max_shard_bytes: int):
        self.folder = Path(folder)
        self.shards = plan_shards(tensors, max_shard_bytes)
        self.names = shard_names(len(self.shards))
        self.order = [t for shard in self.shards for t in shard]
        self.slots: dict[str, Slot] = {}
        self._fds: list[int] = []
        self._hashes = [hashlib.sha256() for _ in self.shards]
        self._hashed = [0] * len(self.shards)  # bytes of each shard hashed so far
        self._sealed = 0
        self.bytes_written = 0
        self.digests: dict[str, str] = {}  # file name -> sha256, complete after ``finish``
        try:
            for i, shard in enumerate(self.shards):
                header = _header_bytes(shard)
                fd = os.open(self.folder / self.names[i], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                _pwrite_all(fd, header, 0)
                offset = len(header)
                for t in shard:
                    self.slots[t.name] = Slot(t, i, offset)
                    offset += t.nbytes
                self.bytes_written += len(header)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.write_blocks(name, [tensor])

    def write_blocks(self, name: str, blocks) -> None:
        """Write one planned tensor from consecutive row blocks (or one block: the whole tensor)."""
        slot = self.slots.get(name)
        if slot is None:
            raise RuntimeError(f"writer got {name}, which is not planned")
        expected, fd = slot.tensor, self._fds[slot.shard]
        written = 0
        for block in blocks:
            if block.dtype != expected.dtype or tuple(block.shape[1:]) != expected.shape[1:]:
                raise RuntimeError(f"{name}: block {tuple(block.shape)} {block.dtype} does not fit "
                                   f"{expected.shape} {expected.dtype}")
            data = block.contiguous().view(-1)
            size = data.numel() * data.element_size()
            if written + size > expected.nbytes:
                raise RuntimeError(f"{name}: more than the planned {expected.nbytes} bytes")
            if size:
                _pwrite_all(fd, memoryview(data.view(torch.uint8).numpy()), slot.offset + written)
            written += size
        if written != expected.nbytes:  # a short tensor would leave a hole in the shard
            raise RuntimeError(f"{name}: wrote {written} bytes, planned {expected.nbytes}")

    def seal(self, name: str) -> None:
        """Mark the next planned tensor as written: hash it into its shard's digest."""
        expected = self.order[self._sealed]
        if name != expected.name:
            raise RuntimeError(f"writer sealed {name}, planned {expected.name}")
        slot = self.slots[name]
        self._hash_up_to(slot.shard, slot.offset + expected.nbytes)
        self.bytes_written += expected.nbytes
        self._sealed += 1

    def _hash_up_to(self, shard: int, end: int) -> None:
        fd, h = self._fds[shard], self._hashes[shard]
        start = self._hashed[shard]
        while start < end:
            chunk = os.pread(fd, min(HASH_CHUNK, end - start), start)
            if not chunk:
                raise RuntimeError(f"{self.names[shard]}: short read at byte {start} of {end}")
            h.update(chunk)  # hashlib lets other threads run while it hashes a large buffer
            start += len(chunk)
        if end > self._hashed[shard]:  # sent to disk now, so the final fsync does not wait for all of it
            _start_writeback(fd, self._hashed[shard], end - self._hashed[shard])
        self._hashed[shard] = end

    def finish(self) -> list[str]:
        """Flush every shard, record its digest, write the index (only for more than one shard, as HF does)."""
        if self._sealed != len(self.order):
            raise RuntimeError(f"writer finished after {self._sealed} of {len(self.order)} tensors")
        for i, fd in enumerate(self._fds):
            self._hash_up_to(i, os.fstat(fd).st_size)
            self.digests[self.names[i]] = self._hashes[i].hexdigest()
        self._close_files(sync=True)
        files = list(self.names)
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in self.order)},
                     "weight_map": {t.name: self.names[i] for i, shard in enumerate(self.shards) for t in shard}}
            raw = json.dumps(index, indent=2).encode()
            (self.folder / "model.safetensors.index.json").write_bytes(raw)
            self.bytes_written += len(raw)
            files.append("model.safetensors.index.json")
            self.digests["model.safetensors.index.json"] = hashlib.sha256(raw).hexdigest()
        return files

    def _close_files(self, sync: bool) -> None:
        fds, self._fds = self._fds, []
        failed: OSError | None = None
        for fd in fds:
            try:
                if sync:
                    os.fsync(fd)
            except OSError as err:
                failed = failed or err
            finally:
                os.close(fd)
        if failed is not None:
            raise failed

    def abort(self) -> None:
        self._close_files(sync=False)


HASH_CHUNK = 8 << 20


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _libc_sync_file_range():
    """Linux's sync_file_range (os does not expose it), or None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _libc_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing these dirty pages to disk, without waiting. Without it they sit in
    the page cache until the final fsync, which then waits for the whole model (about 1 s per GB here)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE)  # advisory: a failure costs only time
