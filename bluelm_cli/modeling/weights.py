"""The tensors of a checkpoint folder by name, read lazily (shared by the loader of quantized releases and the export).

May import: nothing of bluelm_cli.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["WEIGHT_FILES", "WEIGHT_INDEXES", "SourceTensors"]

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class SourceTensors:
    """The checkpoint's tensors by name, read lazily: safetensors through safe_open, .bin through mmap,
    keeping at most one .bin shard mapped at a time."""

    def __init__(self, folder: Path) -> None:
        self._open_path: Path | None = None
        self._open: Any = None
        self._file_of: dict[str, Path] = {}
        for index_name in WEIGHT_INDEXES:
            index = folder / index_name
            if index.is_file():
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                self._file_of.update({name: folder / file for name, file in weight_map.items()})
                break
        else:
            single = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
            if single is None:
                raise FileNotFoundError(f"no weights in {folder}")
            for name in self._names_in(single):
                self._file_of[name] = single

    def _names_in(self, path: Path) -> list[str]:
        return list(self._load(path).keys())

    def _load(self, path: Path) -> Any:
        if path != self._open_path:
            self._open = None  # drop the previous shard's mapping first
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                self._open = safe_open(str(path), framework="pt")
            else:
                self._open = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            self._open_path = path
        return self._open

    def names(self) -> list[str]:
        return list(self._file_of)

    def get(self, name: str) -> torch.Tensor:
        opened = self._load(self._file_of[name])
        return opened.get_tensor(name) if hasattr(opened, "get_tensor") else opened[name]

    def shape(self, name: str) -> tuple[int, ...]:
        opened = self._load(self._file_of[name])
        if hasattr(opened, "get_slice"):
            return tuple(opened.get_slice(name).get_shape())
        return tuple(opened[name].shape)
