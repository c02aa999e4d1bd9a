"""Session-scoped tiny BlueLM checkpoints shared by the modeling, tokenizer and loading tests.

Import the fixtures into a test module (`from checkpoints import checkpoints, tiny_folder`). The
folders are built once per session (a tiny checkpoint takes milliseconds; the SentencePiece model is
trained once per process and cached by `tiny_checkpoint`). Tests must not modify them: a test that
damages a checkpoint builds its own with `fresh_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint

NTK = {"type": "ntkmixed", "factor": 16.0, "power": 0.25}

# The published layouts and variants: 2023 sharded .bin, safetensors, a GQA config, a 32K ntkmixed config.
SPECS: dict[str, TinySpec] = {
    "bin-sharded": TinySpec(weights_format="bin-sharded", seed=0),
    "safetensors": TinySpec(weights_format="safetensors", seed=1),
    "gqa": TinySpec(num_attention_heads=8, num_key_value_heads=2, weights_format="safetensors-sharded", seed=2),
    "ntkmixed-32k": TinySpec(rope_scaling=NTK, weights_format="bin", seed=3),
}


def fresh_checkpoint(folder: Path, **spec: object) -> Path:
    """A new tiny checkpoint of its own, for a test that changes or damages it."""
    return build_checkpoint(Path(folder), TinySpec(**spec))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-checkpoints")
    return {name: build_checkpoint(root / f"BlueLM-tiny-{name}", spec) for name, spec in SPECS.items()}


@pytest.fixture(scope="session")
def tiny_folder(checkpoints: dict[str, Path]) -> Path:
    """The default tiny checkpoint (sharded .bin, like the 2023 releases)."""
    return checkpoints["bin-sharded"]
