"""load_model and its helpers: every bad input is a one-line BlueLMError with an exact message."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from bluelm_cli.core.errors import BlueLMError, UsageError
from bluelm_cli.local.loading import (
    DEFAULT_MODEL,
    LoadedModel,
    check_checkpoint_folder,
    load_model,
    load_tokenizer,
    pick_device,
    pick_dtype,
    resolve_model_folder,
)
from bluelm_cli.modeling import BlueLMForCausalLM, BlueLMTokenizer
from bluelm_cli.testing.tiny_checkpoint import remote_code_was_executed
from checkpoints import NTK, checkpoints, fresh_checkpoint, tiny_folder  # noqa: F401


def _error(model: str | Path, error_type: type[BlueLMError] = BlueLMError, **kwargs: object) -> str:
    with pytest.raises(BlueLMError) as caught:
        load_model(str(model), **kwargs)  # type: ignore[arg-type]
    assert type(caught.value) is error_type, repr(caught.value)
    message = str(caught.value)
    assert "\n" not in message
    assert caught.value.__suppress_context__ or caught.value.__cause__ is None
    return message


# -------------------------------------------------------------------------------------------- bad inputs
def test_folder_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert _error(missing) == (
        f"model folder {missing} does not exist; pass an existing folder or a hub id such as vivo-ai/BlueLM-7B-Chat"
    )


def test_path_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    assert _error(path) == f"{path} is a file, not a model folder; pass the folder that holds config.json"


def test_no_config_json(tmp_path: Path) -> None:
    folder = fresh_checkpoint(tmp_path / "ckpt")
    (folder / "config.json").unlink()
    assert _error(folder) == (
        f"{folder} has no config.json; pass the folder of a BlueLM checkpoint (the one with config.json and the weights)"
    )


def test_config_of_another_architecture(tmp_path: Path) -> None:
    folder = fresh_checkpoint(tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    config["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    assert _error(folder) == (
        f"{folder} holds a 'llama' model, not BlueLM; bluelm-cli runs BlueLM checkpoints such as vivo-ai/BlueLM-7B-Chat"
    )


def test_config_invalid_json(tmp_path: Path) -> None:
    folder = fresh_checkpoint(tmp_path / "ckpt")
    (folder / "config.json").write_text("{not json")
    assert _error(folder) == (
        f"{folder / 'config.json'} is not valid JSON (Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1)); download the checkpoint again"
    )


@pytest.mark.parametrize(("content", "what"), [
    ("[1, 2]", "a JSON list, not an object"),
    ('"bluelm"', "a JSON string, not an object"),
    ("{}", "no model_type"),
    ('{"model_type": 7}', "no model_type"),
])
def test_config_that_is_not_a_model_config(tmp_path: Path, content: str, what: str) -> None:
    # These said "holds a 'None' model": as if the folder were some other model, not a damaged config.
    folder = fresh_checkpoint(tmp_path / "ckpt")
    (folder / "config.json").write_text(content)
    assert _error(folder) == (
        f"{folder / 'config.json'} is not a model config ({what}); download the checkpoint again"
    )


def test_missing_tokenizer_model(tmp_path: Path) -> None:
    folder = fresh_checkpoint(tmp_path / "ckpt")
    (folder / "tokenizer.model").unlink()
    assert _error(folder) == (
        f"{folder} has no tokenizer.model; copy it from the original checkpoint or download it again"
    )


def test_corrupt_tokenizer_model(tmp_path: Path) -> None:
    folder = fresh_checkpoint(tmp_path / "ckpt")
    (folder / "tokenizer.model").write_bytes(bytes(range(256)) * 3 + b"\xff\xfe garbage")
    assert _error(folder) == (
        f"{folder / 'tokenizer.model'} is not a valid SentencePiece model (damaged or truncated); download it again"
    )
    with pytest.raises(BlueLMError):
        load_tokenizer(folder)


def test_no_weights(tmp_path: Path) -> None:
    folder = fresh_checkpoint(tmp_path / "ckpt")
    for path in folder.glob("pytorch_model*"):
        path.unlink()
    assert _error(folder) == (
        f"{folder} has no weights (model.safetensors, pytorch_model.bin or a sharded index); download the checkpoint again"
    )


def test_truncated_bin_shard(tmp_path: Path) -> None:
    folder = fresh_checkpoint(tmp_path / "ckpt", weights_format="bin-sharded")
    shard = folder / "pytorch_model-00001-of-00002.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert _error(folder) == f"{shard} is damaged (truncated or not a weights file); download the checkpoint again"


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(tmp_path: Path, damage: str) -> None:
    folder = fresh_checkpoint(tmp_path / "ckpt", weights_format="safetensors")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(os.urandom(4096) if damage == "garbage" else data[: len(data) // 2])
    assert _error(folder) == f"{path} is damaged (truncated or not a weights file); download the checkpoint again"


@pytest.mark.parametrize(
    ("weights_format", "shard", "index"),
    [
        ("bin-sharded", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json"),
        ("safetensors-sharded", "model-00002-of-00002.safetensors", "model.safetensors.index.json"),
    ],
)
def test_shard_named_in_index_missing(tmp_path: Path, weights_format: str, shard: str, index: str) -> None:
    folder = fresh_checkpoint(tmp_path / "ckpt", weights_format=weights_format)
    (folder / shard).unlink()
    assert _error(folder) == (
        f"the weights in {folder} are incomplete: {shard}, listed in {index}, is missing; download the checkpoint again"
    )


def test_hub_id_not_cached_while_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert _error("vivo-ai/BlueLM-7B-Chat") == (
        f"vivo-ai/BlueLM-7B-Chat is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set; "
        "unset HF_HUB_OFFLINE to download it, or pass a local folder with --model"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_device_cuda_without_cuda(tiny_folder: Path) -> None:
    assert _error(tiny_folder, device="cuda") == (
        "--device cuda was asked for but no CUDA GPU is available to torch; "
        "use --device cpu (slow) or check the driver with nvidia-smi"
    )


def test_unknown_device(tiny_folder: Path) -> None:
    assert _error(tiny_folder, UsageError, device="gpu") == "unknown device 'gpu'; use auto, cuda, cuda:N or cpu"


def test_unknown_dtype(tiny_folder: Path) -> None:
    assert _error(tiny_folder, UsageError, dtype="float8") == (
        "unknown dtype 'float8'; use auto, bfloat16, float16 or float32"
    )


def test_modelscope_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "modelscope", None)
    assert _error("vivo-ai/BlueLM-7B-Chat", source="modelscope") == (
        "--source modelscope needs the modelscope package: pip install modelscope"
    )


def test_unknown_source() -> None:
    assert _error("vivo-ai/BlueLM-7B-Chat", UsageError, source="ftp") == "unknown source 'ftp'; use huggingface or modelscope"


def test_malformed_hub_id() -> None:
    assert _error("vivo-ai/", UsageError) == "'vivo-ai/' is neither a folder nor a hub id like vivo-ai/BlueLM-7B-Chat"


def test_pickled_code_in_bin_is_refused(tmp_path: Path) -> None:
    folder = fresh_checkpoint(tmp_path / "ckpt", weights_format="bin")
    marker = tmp_path / "PICKLE_CODE_RAN"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    weights = folder / "pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    state["model.payload"] = Payload()  # type: ignore[assignment]
    torch.save(state, weights)
    assert not marker.exists()
    assert _error(folder) == (
        f"{weights} holds Python objects besides tensors, which bluelm-cli refuses to unpickle (they could run code); "
        "download the checkpoint again from a trusted source"
    )
    assert not marker.exists()
    assert not remote_code_was_executed(folder)


# -------------------------------------------------------------------------------------------- happy path
def test_pick_dtype_and_device_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) == torch.float32
    assert pick_dtype("bfloat16", cpu) == torch.bfloat16
    assert pick_dtype("float16", cpu) == torch.float16
    assert pick_device("cpu") == cpu
    if not torch.cuda.is_available():
        assert pick_device("auto") == cpu


def test_resolve_and_check_local_folder(tiny_folder: Path) -> None:
    assert resolve_model_folder(str(tiny_folder)) == tiny_folder
    config = check_checkpoint_folder(tiny_folder)
    assert config["model_type"] == "BlueLM"


def test_load_model_returns_everything(tiny_folder: Path) -> None:
    statuses: list[str] = []
    warnings: list[str] = []
    loaded = load_model(str(tiny_folder), device="cpu", on_status=statuses.append, on_warning=warnings.append)
    assert isinstance(loaded, LoadedModel)
    assert isinstance(loaded.model, BlueLMForCausalLM) and isinstance(loaded.tokenizer, BlueLMTokenizer)
    assert not loaded.model.training
    assert loaded.dtype == torch.float32 and loaded.model.dtype == torch.float32
    assert loaded.device == torch.device("cpu")
    assert loaded.folder == tiny_folder and loaded.model_id == str(tiny_folder)
    assert loaded.context_length == 2048
    assert loaded.model.config.tokenizer_vocab_size == loaded.tokenizer.sp_model.get_piece_size() == 600
    assert loaded.model.config.vocab_size > loaded.model.config.tokenizer_vocab_size
    expected_defaults = json.loads((tiny_folder / "generation_config.json").read_text())
    assert loaded.generation_defaults == expected_defaults
    assert loaded.generation_defaults["eos_token_id"] == 2
    assert loaded.quantization is None and loaded.load_seconds >= 0
    assert statuses and warnings == []  # a small model on the CPU is not warned about (issue 21)
    assert not remote_code_was_executed(tiny_folder)


def test_load_model_32k_context(checkpoints: dict[str, Path]) -> None:
    loaded = load_model(str(checkpoints["ntkmixed-32k"]), device="cpu", dtype="auto")
    assert loaded.context_length == int(NTK["factor"]) * 2048 == 32768
    assert loaded.dtype == torch.float32


def test_load_model_in_bfloat16(checkpoints: dict[str, Path]) -> None:
    loaded = load_model(str(checkpoints["safetensors"]), device="cpu", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())


def test_default_model_is_the_chat_checkpoint() -> None:
    assert DEFAULT_MODEL == "vivo-ai/BlueLM-7B-Chat"


def _fake_hub_cache(cache: Path, repo_id: str, source: Path, *, drop: str | None = None) -> Path:
    """The layout huggingface_hub keeps: refs/main → a commit, and a snapshot folder with the files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in source.iterdir():
        if path.name != drop and not path.name.endswith(".py"):
            (snapshot / path.name).write_bytes(path.read_bytes())
    return snapshot


@pytest.mark.parametrize("offline", [True, False])
def test_a_fully_cached_hub_id_loads_without_the_network(
    tmp_path: Path, tiny_folder: Path, monkeypatch: pytest.MonkeyPatch, offline: bool
) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = _fake_hub_cache(cache, "vivo-ai/BlueLM-7B-Chat", tiny_folder)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # any network use would fail
    assert resolve_model_folder("vivo-ai/BlueLM-7B-Chat") == snapshot
    assert load_model("vivo-ai/BlueLM-7B-Chat").folder == snapshot


def test_a_partly_cached_hub_id_is_not_used_offline(tmp_path: Path, tiny_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    shard = "pytorch_model-00002-of-00002.bin"
    assert (tiny_folder / shard).is_file()
    _fake_hub_cache(cache, "vivo-ai/BlueLM-7B-Chat", tiny_folder, drop=shard)  # an interrupted download
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BlueLMError, match="incomplete|not in the Hugging Face cache"):
        load_model("vivo-ai/BlueLM-7B-Chat")
