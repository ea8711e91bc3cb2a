"""A Hugging Face model folder as a set of named tensors spread over safetensors shards."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import InvalidInput
from .safetensors_io import SafetensorsFile, TensorInfo

INDEX = "model.safetensors.index.json"


class ModelFolder:
    """Tensors by name over one or many shards (index or single file); config.json when present."""

    def __init__(self, path: Path, label: str):
        self.path = Path(path)
        self.label = label  # how errors name this input, e.g. "spec.models[1] (file:///...)"
        if not self.path.is_dir():
            raise InvalidInput(f"{label}: {self.path} is not a model folder")
        self.config = self._read_json("config.json") or {}
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, SafetensorsFile] = {}
        index = self._read_json(INDEX)
        if index is not None:
            self._open_indexed(index)
        else:
            shards = sorted(self.path.glob("*.safetensors"))
            if not shards:
                raise InvalidInput(f"{label}: no *.safetensors in {self.path} (other weight formats are not read)")
            for shard in shards:
                self._open_shard(shard.name)
        if not self.where:
            raise InvalidInput(f"{label}: {self.path} holds no tensors")

    def _read_json(self, name: str) -> dict | None:
        path = self.path / name
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise InvalidInput(f"{self.label}: {path}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise InvalidInput(f"{self.label}: {path}: expected a JSON object")
        return data

    def _open_shard(self, filename: str) -> SafetensorsFile:
        if filename not in self.files:
            path = self.path / filename
            if Path(filename).name != filename or not path.is_file():
                raise InvalidInput(f"{self.label}: shard {filename} named by the index is missing in {self.path}")
            shard = SafetensorsFile(path)
            self.files[filename] = shard
            for name in shard.tensors:
                if name in self.where and self.where[name] is not shard:
                    raise InvalidInput(f"{self.label}: tensor {name} appears in {self.where[name].path.name} "
                                       f"and {filename}")
                self.where[name] = shard
        return self.files[filename]

    def _open_indexed(self, index: dict) -> None:
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InvalidInput(f"{self.label}: {self.path / INDEX}: no weight_map")
        wanted: dict[str, list[str]] = {}
        for name, filename in weight_map.items():
            wanted.setdefault(str(filename), []).append(name)
        for filename, names in wanted.items():
            shard = self._open_shard(filename)
            for name in names:
                if name not in shard.tensors:
                    raise InvalidInput(f"{self.label}: the index puts {name} in {filename}, whose header lacks it")
        # Tensors in a shard but absent from the index are still tensors of the model.

    # ------------------------------------------------------------------ access
    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        """Tensor names in on-disk order (shard, then offset): reading in this order is sequential."""
        order = {f: i for i, f in enumerate(self.files.values())}
        return sorted(self.where, key=lambda n: (order[self.where[n]], self.where[n].tensors[n].start))

    def info(self, name: str) -> TensorInfo:
        return self.where[name].tensors[name]

    def view(self, name: str) -> torch.Tensor:
        return self.where[name].view(name)

    def release(self, name: str, offset: int = 0, length: int | None = None) -> None:
        self.where[name].release(name, offset, length)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
