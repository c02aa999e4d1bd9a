"""Find a BlueLM checkpoint (local folder, Hugging Face Hub, ModelScope), pick device and dtype, load it.

Every problem a user can meet here becomes a `BlueLMError` whose one-line message names the path or id
and says what to do. Nothing in a checkpoint folder is ever executed: the `*.py` files shipped beside
the weights are not downloaded and not imported; BlueLM is implemented natively in `bluelm_cli.modeling`.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from bluelm_cli.core.sizes import SLOW_ON_CPU_PARAMETERS, describe_parameters, parameter_count
from bluelm_cli.core.errors import BlueLMError, UsageError
from bluelm_cli.modeling import BlueLMConfig, BlueLMForCausalLM, BlueLMTokenizer
from bluelm_cli.modeling.weights import WEIGHT_FILES, WEIGHT_INDEXES
from bluelm_cli.config.settings import read_generation_config

DEFAULT_MODEL = "vivo-ai/BlueLM-7B-Chat"
_METADATA_PATTERNS = ["config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                      "special_tokens_map.json", "quantize_config.json"]  # the last: AutoGPTQ releases
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class LoadedModel:
    model: BlueLMForCausalLM
    tokenizer: BlueLMTokenizer
    model_id: str
    folder: Path
    device: torch.device
    dtype: torch.dtype
    context_length: int
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    load_seconds: float = 0.0
    quantization: str | None = None  # bitsandbytes at load time (--load-in-8bit / --load-in-4bit)
    # A published quantized release read from its files, e.g. "AWQ GEMM, 4-bit, group 128"; its weights are
    # dequantised at load time into `dtype`, so the engine (fast path included) runs plain linears.
    weights_format: str | None = None


# ---------------------------------------------------------------------------------------------- resolving
def looks_like_path(model: str) -> bool:
    """Hub ids are exactly `owner/name`; anything else, or anything that exists on disk, is a path."""
    if Path(model).expanduser().exists() or model.startswith((".", "/", "~")):
        return True
    return model.count("/") != 1


def resolve_model_folder(model: str, source: str = "huggingface", on_status: Callable[[str], None] | None = None) -> Path:
    """A local folder as given, or a hub id downloaded (or found in the cache) into its normal cache."""
    if looks_like_path(model):
        folder = Path(model).expanduser()
        if not folder.exists():
            raise BlueLMError(f"model folder {model} does not exist; pass an existing folder or a hub id such as {DEFAULT_MODEL}")
        if not folder.is_dir():
            raise BlueLMError(f"{model} is a file, not a model folder; pass the folder that holds config.json")
        return folder
    if not all(model.split("/")):
        raise UsageError(f"'{model}' is neither a folder nor a hub id like {DEFAULT_MODEL}")
    if source == "modelscope":
        return _download_from_modelscope(model, on_status)
    if source != "huggingface":
        raise UsageError(f"unknown source '{source}'; use huggingface or modelscope")
    return _download_from_hub(model, on_status)


def _download_from_hub(repo_id: str, on_status: Callable[[str], None] | None) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # its retry chatter would bury our one-line error
    all_weights = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json"]
    cached = _complete_cached_snapshot(repo_id, _METADATA_PATTERNS + all_weights)
    if cached is not None:
        return cached  # a complete copy is cached: start without touching the network
    if on_status:
        on_status(f"Fetching {repo_id} from the Hugging Face Hub (cache: {constants.HF_HUB_CACHE})")
    # The small files first: it fails fast when offline or the id is wrong, before any listing retries.
    _snapshot(repo_id, _METADATA_PATTERNS)
    return _snapshot(repo_id, _METADATA_PATTERNS + _hub_weight_patterns(repo_id))


def _snapshot(repo_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except GatedRepoError:
        raise BlueLMError(f"{repo_id} is gated on the Hugging Face Hub; accept its license there and run `hf auth login`") from None
    except RepositoryNotFoundError:
        raise BlueLMError(f"no model {repo_id} on the Hugging Face Hub; check the id (for example {DEFAULT_MODEL}) or pass a local folder") from None
    except RevisionNotFoundError:
        raise BlueLMError(f"{repo_id} has no such revision on the Hugging Face Hub") from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise BlueLMError(
                f"{repo_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set; "
                "unset HF_HUB_OFFLINE to download it, or pass a local folder with --model"
            ) from None
        raise BlueLMError(
            f"could not download {repo_id}: the Hugging Face Hub is unreachable and nothing is cached; "
            "check the network (or set HF_ENDPOINT to a mirror), or pass a local folder with --model"
        ) from None
    except OSError as error:  # disk full, permissions in HF_HOME
        raise BlueLMError(f"could not store {repo_id} in the Hugging Face cache ({_first_line(error)})") from None


def _complete_cached_snapshot(repo_id: str, patterns: list[str]) -> Path | None:
    """The cached snapshot of `repo_id` when it holds a whole checkpoint (an interrupted download does not)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        check_checkpoint_folder(folder)
        _indexed_shards(folder)
    except Exception:  # not cached, or cached only in part
        return None
    return folder


def _hub_weight_patterns(repo_id: str) -> list[str]:
    """Download one weight format only: safetensors when the repo has them, else the .bin shards."""
    from huggingface_hub import list_repo_files

    try:
        files = list_repo_files(repo_id)
    except Exception:  # listing failed though the small files came: take whatever the repo has
        return ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json"]
    if any(name.endswith(".safetensors") for name in files):
        return ["*.safetensors", "*.safetensors.index.json"]
    return ["*.bin", "*.bin.index.json"]


def _download_from_modelscope(model_id: str, on_status: Callable[[str], None] | None) -> Path:
    try:
        from modelscope import snapshot_download  # type: ignore[import-not-found]
    except ImportError:
        raise BlueLMError("--source modelscope needs the modelscope package: pip install modelscope") from None
    if on_status:
        on_status(f"Fetching {model_id} from ModelScope")
    try:
        return Path(snapshot_download(model_id, ignore_file_pattern=[r".*\.py$"]))
    except Exception as error:  # modelscope raises plain exceptions for unknown ids and network errors
        raise BlueLMError(f"could not download {model_id} from ModelScope: {_first_line(error)}") from None


# -------------------------------------------------------------------------------------------- validating
def check_checkpoint_folder(folder: Path) -> dict[str, Any]:
    """The folder's config.json, once it is known to hold a BlueLM checkpoint with a tokenizer and weights."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise BlueLMError(f"{folder} has no config.json; pass the folder of a BlueLM checkpoint (the one with config.json and the weights)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BlueLMError(f"{config_path} is not valid JSON ({error}); download the checkpoint again") from None
    # A config that is not even an object, or names no model type, is damaged, not another model's.
    if not isinstance(config, dict):
        kind = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(config), "null")
        raise BlueLMError(f"{config_path} is not a model config (a JSON {kind}, not an object); download the checkpoint again")
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise BlueLMError(f"{config_path} is not a model config (no model_type); download the checkpoint again")
    if model_type.lower() != "bluelm":
        raise BlueLMError(
            f"{folder} holds a '{model_type}' model, not BlueLM; bluelm-cli runs BlueLM checkpoints such as {DEFAULT_MODEL}"
        )
    if not (folder / "tokenizer.model").is_file():
        raise BlueLMError(f"{folder} has no tokenizer.model; copy it from the original checkpoint or download it again")
    if not any((folder / name).is_file() for name in WEIGHT_INDEXES + WEIGHT_FILES):
        raise BlueLMError(
            f"{folder} has no weights (model.safetensors, pytorch_model.bin or a sharded index); download the checkpoint again"
        )
    _indexed_shards(folder)  # every shard an index names is a file in this folder (before any is read)
    return config


# --------------------------------------------------------------------------------------- device and dtype
def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``bfloat16``, as users write it."""
    return str(dtype).removeprefix("torch.")


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UsageError(f"unknown device '{requested}'; use auto, cuda, cuda:N or cpu") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BlueLMError(f"--device {requested} was asked for but no CUDA GPU is available to torch; use --device cpu (slow) or check the driver with nvidia-smi")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BlueLMError(f"--device {requested}: there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise UsageError(f"unsupported device '{requested}'; use auto, cuda, cuda:N or cpu")
    return device


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if requested not in _DTYPES:
        raise UsageError(f"unknown dtype '{requested}'; use auto, bfloat16, float16 or float32")
    return _DTYPES[requested]


# ------------------------------------------------------------------------------------------------ loading
def load_tokenizer(folder: Path) -> BlueLMTokenizer:
    model_path = folder / "tokenizer.model"
    try:
        return BlueLMTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as error:
        import sentencepiece

        try:  # tell a damaged SentencePiece file apart from another tokenizer problem
            sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        except Exception:
            raise BlueLMError(f"{model_path} is not a valid SentencePiece model (damaged or truncated); download it again") from None
        raise BlueLMError(
            f"the tokenizer in {folder} could not be loaded ({_first_line(error)}); download the checkpoint again"
        ) from None


def load_model(
    model: str = DEFAULT_MODEL,
    *,
    source: str = "huggingface",
    device: str = "auto",
    dtype: str = "auto",
    quantization: str | None = None,
    on_status: Callable[[str], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    on_config: Callable[[int], None] | None = None,
) -> LoadedModel:
    """Resolve, check and load a BlueLM checkpoint. Raises BlueLMError with a user-facing message.

    `on_config(context_length)` runs once config.json is read, before any weight is: settings that can't
    fit the model are refused there, not after minutes of loading."""
    started = time.perf_counter()
    folder = resolve_model_folder(model, source, on_status)
    check_checkpoint_folder(folder)
    target = pick_device(device)
    torch_dtype = pick_dtype(dtype, target)
    layout = _quantized_layout(folder)
    if layout is not None and quantization == "8bit":
        raise BlueLMError(f"{folder} is already quantized ({layout.describe()}); drop --load-in-8bit")
    if quantization and target.type != "cuda" and layout is None:
        raise BlueLMError(f"--load-in-{quantization} needs a CUDA GPU (bitsandbytes); drop it to run on the CPU")

    tokenizer = load_tokenizer(folder)
    if on_status:
        on_status(f"Loading {model} onto {target} as {dtype_name(torch_dtype)}")
    config = _read_config(folder)
    if on_config:
        on_config(config.context_length)
    if target.type == "cpu" and on_warning:
        # From the model's size, not the device alone: a small model runs well on a CPU.
        parameters = parameter_count(config.to_dict())
        if parameters >= SLOW_ON_CPU_PARAMETERS:
            weights_gb = parameters * torch.tensor([], dtype=torch_dtype).element_size() / 1e9
            on_warning(
                f"no CUDA GPU found; running a {describe_parameters(parameters)}-parameter model on the CPU is slow"
                f" (about {weights_gb:.0f} GB of weights are read for every token)"
            )
    generation_defaults, problems = read_generation_config(folder)
    for problem in problems:
        if on_warning:
            on_warning(problem)
    config.tokenizer_vocab_size = tokenizer.sp_model.get_piece_size()
    if layout is not None:
        # --load-in-4bit on a 4-bit release: keep its own 4-bit tensors (no bitsandbytes, any device).
        network, weights_format = _load_dequantized(
            folder, config, layout, target, torch_dtype, model, keep_4bit=quantization == "4bit"
        )
        network.generation_config = _generation_config(generation_defaults)
        bnb_quantization = None
    else:
        network = _load_with_transformers(folder, config, model, generation_defaults, target, device, torch_dtype, quantization)
        weights_format, bnb_quantization = None, quantization
    return LoadedModel(
        model=network,
        tokenizer=tokenizer,
        model_id=model,
        folder=folder,
        device=target,
        dtype=torch_dtype,
        context_length=config.context_length,
        generation_defaults=generation_defaults,
        load_seconds=time.perf_counter() - started,
        quantization=bnb_quantization,
        weights_format=weights_format,
    )


def _load_with_transformers(
    folder: Path, config: BlueLMConfig, model: str, generation_defaults: dict[str, Any], target: torch.device,
    device: str, torch_dtype: torch.dtype, quantization: str | None,
) -> BlueLMForCausalLM:
    """A plain or bitsandbytes checkpoint through `from_pretrained`, with every failure as one line."""
    kwargs: dict[str, Any] = {
        "config": config,
        "dtype": torch_dtype,
        "trust_remote_code": False,
        # Ours, from the checked values: transformers would refuse a bad file and blame the weights.
        "generation_config": _generation_config(generation_defaults),
    }
    if quantization:
        kwargs["quantization_config"] = _bitsandbytes_config(quantization, torch_dtype)
        kwargs["device_map"] = {"": target.index or 0}
    elif target.type == "cuda" and device == "auto" and torch.cuda.device_count() > 1:
        kwargs["device_map"] = "auto"  # spread the layers over every GPU with accelerate
    else:
        kwargs["device_map"] = {"": target}
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # our own status line says what is loading
    verbosity = transformers_logging.get_verbosity()
    # transformers logs a multi-line load report (with colour codes) before its errors; ours is one line.
    transformers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            network, info = BlueLMForCausalLM.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    except torch.cuda.OutOfMemoryError:
        raise BlueLMError(
            f"out of GPU memory while loading {model} in {dtype_name(torch_dtype)}; "
            "free the GPU, or use --load-in-8bit / --load-in-4bit (about 8 / 5 GB)"
        ) from None
    except Exception as error:
        import pickle

        from safetensors import SafetensorError

        if not isinstance(error, (OSError, RuntimeError, ValueError, EOFError, KeyError, pickle.UnpicklingError, SafetensorError)):
            raise
        if isinstance(error, RuntimeError) and "ignore_mismatched_sizes" in str(error):
            raise BlueLMError(
                f"the weights in {folder} do not have the sizes its config.json describes (the config is from"
                " another model); download the checkpoint again"
            ) from None
        if isinstance(error, RuntimeError) and "out of memory" in str(error).lower():
            raise BlueLMError(f"out of memory while loading {model}; try --load-in-4bit or a smaller --dtype") from None
        problem = weight_file_problem(folder)
        if problem:
            raise BlueLMError(problem) from None
        raise BlueLMError(f"the weights in {folder} are damaged or incomplete ({_first_line(error)}); download the checkpoint again") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    unexpected = sorted(info.get("unexpected_keys", []))
    if unexpected:  # e.g. a config.json with fewer layers than the weights: never run a truncated model
        raise BlueLMError(
            f"the weights in {folder} hold {len(unexpected)} tensors its config.json does not describe (first:"
            f" {unexpected[0]}); the config is from another model, download the checkpoint again"
        )
    missing = [key for key in info.get("missing_keys", []) if "rotary_emb" not in key]
    if missing:
        raise BlueLMError(
            f"the weights in {folder} are incomplete: {len(missing)} tensors missing (first: {sorted(missing)[0]}); download the checkpoint again"
        )
    network.eval()
    return network


def _quantized_layout(folder: Path) -> Any:
    """The published quantized layout of the folder's weights (None for plain ones), or one line saying why not."""
    from bluelm_cli.modeling.quantized import UnsupportedQuantization, detect_layout

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    try:
        return detect_layout(config, folder)
    except (UnsupportedQuantization, ValueError, TypeError) as error:
        raise BlueLMError(f"{folder} has a quantization bluelm-cli cannot read: {error}") from None


def _load_dequantized(
    folder: Path, config: BlueLMConfig, layout: Any, target: torch.device, dtype: torch.dtype, model: str,
    *, keep_4bit: bool = False,
) -> tuple[BlueLMForCausalLM, str]:
    """A quantized release as a plain BlueLM: each linear dequantised (exactly, in float32, as the publisher's
    kernel reads the file) and then cast to `dtype` on `target`, one tensor at a time. With `keep_4bit` the
    linears stay in their 4-bit tensors (PackedInt4Linear) and are dequantised the same way at every forward.

    No transformers quantizer is involved: none recognises Chat-4bits, and transformers hands AWQ/GPTQ to
    GPU kernel packages; the arithmetic here is the files' own and runs anywhere."""
    import pickle

    from safetensors import SafetensorError

    from bluelm_cli.modeling.modeling_bluelm import BlueLMRotaryEmbedding
    from bluelm_cli.modeling.quantized import QuantizedTensors, UnsupportedQuantization
    from bluelm_cli.modeling.weights import SourceTensors

    for key in ("quantization_config", "quantization_bit"):  # the weights will be plain: nothing may treat them as not
        if hasattr(config, key):
            delattr(config, key)
    config.dtype = dtype  # as from_pretrained records it for a plain checkpoint
    try:
        tensors = QuantizedTensors(SourceTensors(folder), layout, device=target)
        with torch.device("meta"):
            network = BlueLMForCausalLM(config)
        expected = {name: tuple(tensor.shape) for name, tensor in network.state_dict().items()}
        names = [name for name in tensors.names() if not name.endswith("rotary_emb.inv_freq")]
        missing = sorted(set(expected) - set(names))
        if missing:
            raise BlueLMError(
                f"the weights in {folder} are incomplete: {len(missing)} tensors missing (first: {missing[0]}); download the checkpoint again"
            )
        unexpected = sorted(set(names) - set(expected))
        if unexpected:
            raise BlueLMError(
                f"the weights in {folder} hold {len(unexpected)} tensors its config.json does not describe (first:"
                f" {unexpected[0]}); the config is from another model, download the checkpoint again"
            )
        wrong = [name for name in names if tensors.shape(name) != expected[name]]
        if wrong:
            raise BlueLMError(
                f"the weights in {folder} do not have the sizes its config.json describes ({wrong[0]} is"
                f" {list(tensors.shape(wrong[0]))}, the config says {list(expected[wrong[0]])}); download the checkpoint again"
            )
        packed = {name: tensors.packed_linear(name) for name in expected if keep_4bit and tensors.is_quantized(name)}
        state = {name: tensors.get(name).to(device=target, dtype=dtype) for name in expected if name not in packed}
    except UnsupportedQuantization as error:
        raise BlueLMError(f"{folder}: {error}") from None
    except torch.cuda.OutOfMemoryError:
        raise BlueLMError(f"out of GPU memory while loading {model} dequantised to {dtype_name(dtype)}; free the GPU") from None
    except (OSError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError, SafetensorError) as error:
        problem = weight_file_problem(folder)
        raise BlueLMError(
            problem or f"the weights in {folder} are damaged or incomplete ({_first_line(error)}); download the checkpoint again"
        ) from None
    for name, linear in packed.items():
        parent, _, child = name.removesuffix(".weight").rpartition(".")
        setattr(network.get_submodule(parent), child, linear)
    network.load_state_dict(state, strict=not packed, assign=True)
    for module in network.modules():  # non-persistent buffers were made on the meta device: compute them here
        if isinstance(module, BlueLMRotaryEmbedding):
            module.reset_frequencies(target)  # inv_freq, original_inv_freq, attention scaling: any RoPE type
    still_meta = [name for name, tensor in [*network.named_parameters(), *network.named_buffers()] if tensor.is_meta]
    if still_meta:  # never run a model with a weight nothing was loaded into
        raise BlueLMError(f"the weights in {folder} are incomplete: {still_meta[0]} was not loaded; download the checkpoint again")
    network.eval()
    how = f"kept 4-bit, computing in {dtype_name(dtype)}" if packed else f"dequantised to {dtype_name(dtype)}"
    return network, f"{tensors.describe()}, {how}"


def _indexed_shards(folder: Path) -> list[Path]:
    """Every shard the folder's weight indexes name; BlueLMError for an invalid index or a missing shard."""
    shards: list[Path] = []
    for index_name in WEIGHT_INDEXES:
        index = folder / index_name
        if not index.is_file():
            continue
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise BlueLMError(f"{index} is not a valid weight index; download the checkpoint again") from None
        for name in names:
            shard = folder / name
            if "/" in name or "\\" in name or name.startswith(".") or not shard.resolve().is_relative_to(folder.resolve()):
                # An index must name files beside it: never read /dev/zero or ../../etc/passwd as weights.
                raise BlueLMError(f"{index} names {name!r}, which is not a file in {folder}; the index is damaged")
            if not shard.is_file():
                raise BlueLMError(
                    f"the weights in {folder} are incomplete: {name}, listed in {index_name}, is missing; download the checkpoint again"
                )
        shards += [folder / name for name in names]
    return shards


def weight_file_problem(folder: Path) -> str | None:
    """After loading failed: the message naming the weight file that is missing, damaged or unsafe, if one is."""
    import pickle

    try:
        files = _indexed_shards(folder)
    except BlueLMError as problem:
        return str(problem)
    files += [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    for path in files:
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt"):
                    pass
            else:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            return (
                f"{path} holds Python objects besides tensors, which bluelm-cli refuses to unpickle (they could run code); "
                "download the checkpoint again from a trusted source"
            )
        except Exception:
            return f"{path} is damaged (truncated or not a weights file); download the checkpoint again"
    return None


def _bitsandbytes_config(quantization: str, compute_dtype: torch.dtype) -> Any:
    try:
        import bitsandbytes  # noqa: F401  # type: ignore[import-not-found]
    except ImportError:
        raise BlueLMError(f"--load-in-{quantization} needs bitsandbytes: pip install 'bluelm-cli[quant]'") from None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_type="nf4")


def _generation_config(values: dict[str, Any]) -> Any:
    from transformers import GenerationConfig
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its notes on sampling flags are about generate(), not us
    try:
        return GenerationConfig.from_dict(dict(values))
    except Exception:  # noqa: BLE001 - any other bad field: transformers' defaults, our settings still apply
        return GenerationConfig()
    finally:
        transformers_logging.set_verbosity(verbosity)


def _read_config(folder: Path) -> BlueLMConfig:
    """config.json as a BlueLMConfig, or one line saying what is wrong with it."""
    try:
        config = BlueLMConfig.from_pretrained(str(folder))
    except BlueLMError:
        raise
    except Exception as error:  # noqa: BLE001 - transformers' validation errors span several lines
        raise BlueLMError(
            f"{folder / 'config.json'} is not a valid BlueLM config ({_first_line(error)}); download the checkpoint again"
        ) from None
    if config.context_length < 16:
        raise BlueLMError(
            f"{folder / 'config.json'} says the context window is {config.context_length} tokens; the config is"
            " damaged, download the checkpoint again"
        )
    return config


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
