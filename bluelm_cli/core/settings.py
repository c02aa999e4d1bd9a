"""The settings table: every setting, its default and its validation, and the sampling values a backend takes.

:data:`SPECS` is the single table of settings; the CLI options, the REPL's ``/set KEY VALUE``, the config
file and both backends validate through :func:`parse_setting`, nowhere else. It is shared by every layer,
so it lives in core; where each value comes from (flags, environment, config file, checkpoint) is resolved
in :mod:`bluelm_cli.config.settings`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from bluelm_cli.core.errors import UsageError
from bluelm_cli.core.secrets import redact_url

# --------------------------------------------------------------------------- parsers
class _Invalid(Exception):
    """Raised by a parser; the spec turns it into the user-facing message."""


def _show(raw: object) -> str:
    if isinstance(raw, bool):
        return "true" if raw else "false"
    return str(raw)


def _is_unset(raw: object) -> bool:
    return raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none", "unset", "off", "null"))


def _to_float(raw: object) -> float:
    if isinstance(raw, bool):
        raise _Invalid
    if isinstance(raw, (int, float)):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            value = float(raw.strip())
        except ValueError:
            raise _Invalid from None
    else:
        raise _Invalid
    if not math.isfinite(value):
        raise _Invalid
    return value


def _to_int(raw: object) -> int:
    if isinstance(raw, bool):
        raise _Invalid
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float):
        if raw.is_integer():
            return int(raw)
        raise _Invalid
    if isinstance(raw, str):
        text = raw.strip().replace("_", "")
        if re.fullmatch(r"[+-]?\d+", text):
            return int(text)
    raise _Invalid


def _float_in(lo: float, hi: float, *, lo_open: bool = False) -> Callable[[object], float]:
    def parse(raw: object) -> float:
        value = _to_float(raw)
        if value > hi or value < lo or (lo_open and value == lo):
            raise _Invalid
        return value

    return parse


def _int_at_least(lo: int) -> Callable[[object], int]:
    def parse(raw: object) -> int:
        value = _to_int(raw)
        if value < lo:
            raise _Invalid
        return value

    return parse


def _int_between(lo: int, hi: int) -> Callable[[object], int]:
    def parse(raw: object) -> int:
        value = _to_int(raw)
        if not lo <= value <= hi:
            raise _Invalid
        return value

    return parse


def _optional(parse: Callable[[object], Any]) -> Callable[[object], Any]:
    def wrapped(raw: object) -> Any:
        return None if _is_unset(raw) else parse(raw)

    return wrapped


def _choice(*choices: str) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        if isinstance(raw, str) and raw.strip().lower() in choices:
            return raw.strip().lower()
        raise _Invalid

    return parse


def _parse_device(raw: object) -> str:
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
            return text
    raise _Invalid


def _parse_bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
    raise _Invalid


def _parse_model(raw: object) -> str:
    if isinstance(raw, Path):
        raw = str(raw)
    if isinstance(raw, str) and raw.strip():
        return raw.strip()
    raise _Invalid


def shown_value(name: str, value: Any) -> Any:
    """A setting's value as it may be printed: the API URL without the password of its user info."""
    if name == "api" and isinstance(value, str):
        return redact_url(value)
    return value


def _parse_api(raw: object) -> str:
    # The scheme in any case (`HTTP://`), as curl accepts it.
    if isinstance(raw, str) and re.fullmatch(r"(?i:https?)://[^\s/]+(/\S*)?", raw.strip()):
        return raw.strip()
    raise _Invalid


def _parse_system(raw: object) -> str | None:
    """The text, or None (no system prompt) for blank text, `none`, `unset`, `off` or an empty `""`/`''`."""
    if raw is None:
        return None
    if isinstance(raw, str):
        if _is_unset(raw) or raw.strip() in ('""', "''"):
            return None
        return raw
    raise _Invalid


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class SettingSpec:
    """One setting. ``parse`` turns a raw value (string from a flag/REPL, or a TOML value) into the
    typed value or raises; ``expected`` completes the message "<name> must be …"."""

    name: str
    type: type
    default: object
    help: str
    parse: Callable[[object], Any] = field(repr=False)
    expected: str
    env: str | None = None
    sampling: bool = False  # may be changed with /set in a running chat
    optional: bool = False  # may be unset (None)
    metavar: str = "VALUE"  # in the command line's help
    short: str | None = None  # a one-letter flag besides --the-name

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def validate(self, raw: object) -> Any:
        """The typed value, or UsageError with a one-line message naming the valid range."""
        try:
            return self.parse(raw)
        except _Invalid:
            raise UsageError(f"{self.name} must be {self.expected}, got '{shown_value(self.name, _show(raw))}'") from None


SPECS: dict[str, SettingSpec] = {
    spec.name: spec
    for spec in (
        SettingSpec(
            "model", str, "vivo-ai/BlueLM-7B-Chat",
            "Model id on the hub, or a local checkpoint directory.",
            _parse_model, "a model id (e.g. vivo-ai/BlueLM-7B-Chat) or a local directory", env="BLUELM_MODEL", metavar="ID|PATH", short="-m",
        ),
        SettingSpec(
            "source", str, "huggingface", "Where to download the model from: huggingface or modelscope.",
            _choice("huggingface", "modelscope"), "'huggingface' or 'modelscope'", metavar="NAME",
        ),
        SettingSpec(
            "device", str, "auto", "auto, cuda, cuda:N or cpu.",
            _parse_device, "'auto', 'cuda', 'cuda:N' (N = GPU index) or 'cpu'", metavar="DEVICE",
        ),
        SettingSpec(
            "dtype", str, "auto", "Weights dtype: auto, bfloat16, float16 or float32.",
            _choice("auto", "bfloat16", "float16", "float32"), "'auto', 'bfloat16', 'float16' or 'float32'", metavar="DTYPE",
        ),
        SettingSpec(
            "max_new_tokens", int, 512, "Most tokens generated per answer.",
            _int_at_least(1), "a whole number of at least 1", sampling=True, metavar="N", short="-n",
        ),
        SettingSpec(
            "temperature", float, 0.7, "Sampling temperature; 0 = greedy.",
            _float_in(0.0, 2.0), "a number from 0 to 2 (0 = greedy)", sampling=True, metavar="T", short="-t",
        ),
        SettingSpec(
            "top_p", float, 0.9, "Nucleus sampling: keep the smallest token set with this much probability.",
            _float_in(0.0, 1.0, lo_open=True), "a number greater than 0 and at most 1", sampling=True, metavar="P",
        ),
        SettingSpec(
            "top_k", int, 0, "Keep only the K most likely tokens; 0 disables.",
            _int_at_least(0), "a whole number of at least 0 (0 disables it)", sampling=True, metavar="K",
        ),
        SettingSpec(
            "repetition_penalty", float, 1.1, "Penalty for repeating tokens; 1.0 = none.",
            _float_in(1.0, 2.0), "a number from 1.0 to 2.0 (1.0 = no penalty)", sampling=True, metavar="R",
        ),
        SettingSpec(
            "seed", int, None, "Random seed for reproducible sampling; unset = random.",
            _optional(_int_between(0, 2**63 - 1)), "a whole number from 0 to 2^63-1, or 'none' for a random seed",
            sampling=True, optional=True, metavar="N",
        ),
        SettingSpec(
            "system", str, None, "Text placed before the first turn (BlueLM has no system role).",
            _parse_system, "text", sampling=True, optional=True, metavar="TEXT", short="-s",
        ),
        SettingSpec(
            "api", str, None, "Chat with a model served at this OpenAI-compatible URL instead of loading one.",
            _optional(_parse_api), "an http:// or https:// URL such as http://localhost:8000/v1, or 'none'",
            env="BLUELM_API", optional=True, metavar="URL",
        ),
        SettingSpec(
            "compile", bool, True, "Use the CUDA fast path (static KV cache, decode replayed from CUDA graphs).",
            _parse_bool, "true or false",
        ),
        SettingSpec(
            "kv_cache", str, "model",
            "KV cache storage: model (the weights' dtype) or int8 (per-head scales: half of bf16, 32K fits beside bf16 7B on 24 GB).",
            _choice("model", "int8"), "'model' or 'int8'", metavar="KIND",
        ),
        SettingSpec(
            "quantize", str, None,
            "Weight-only quantization through torchao after loading: int8 (CPU or GPU) or int4 (CUDA, bfloat16);"
            " keeps the CUDA fast path. Unset = the checkpoint's weights.",
            _optional(_choice("int8", "int4")), "'int8', 'int4' or 'none'", optional=True, metavar="SCHEME",
        ),
        SettingSpec(
            "context_shift", bool, False,
            "When the context window is full, keep the cache of the turns that stay and re-rotate their keys to their"
            " new positions instead of prefilling them again. Faster, but answers then differ from a fresh prefill"
            " of the kept text: the kept turns were read while the dropped ones were still there.",
            _parse_bool, "true or false",
        ),
        SettingSpec(
            "prompt_lookup", bool, None,
            "Decode with prompt-lookup drafts: runs of the prompt or answer that the model repeats are checked in one"
            " forward. Greedy: the same tokens as without it; sampled: the same distribution (exact speculative"
            " sampling), but a seed gives other tokens. Unset: on for the eager path (measured faster on a CPU), off"
            " with the CUDA fast path (not measured there yet).",
            _optional(_parse_bool), "true, false or 'none' (on for the eager path only)", optional=True,
        ),
        SettingSpec(
            "history", bool, True, "Keep the chat's input history in a file (Up, Ctrl-R); off for typing secrets.",
            _parse_bool, "true or false",
        ),
    )
}

SETTING_NAMES: tuple[str, ...] = tuple(SPECS)
SAMPLING_KEYS: tuple[str, ...] = tuple(name for name, spec in SPECS.items() if spec.sampling)
# The keys of SamplingSettings (the sampling keys minus ``system``, which is part of the prompt).
GENERATION_KEYS: tuple[str, ...] = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")

SOURCE_FLAG = "flag"
SOURCE_DEFAULT = "default"
SOURCE_CHECKPOINT = "checkpoint generation_config.json"


def _unknown(name: object) -> UsageError:
    return UsageError(f"unknown setting '{name}'; known settings: {', '.join(SETTING_NAMES)}")


def get_spec(name: str) -> SettingSpec:
    try:
        return SPECS[name]
    except (KeyError, TypeError):
        raise _unknown(name) from None


def parse_setting(name: str, raw: object) -> Any:
    """Validate one setting from a string (flag, ``/set``) or an already typed value (TOML).

    Raises UsageError: ``temperature must be a number from 0 to 2 (0 = greedy), got '-1'``.
    """
    return get_spec(name).validate(raw)


def parse_sampling_setting(name: str, raw: object) -> Any:
    """Like :func:`parse_setting`, for ``/set`` in a running chat: only :data:`SAMPLING_KEYS` may change."""
    spec = get_spec(name)
    if not spec.sampling:
        raise UsageError(
            f"{name} can't be changed in a running chat; restart with --{name.replace('_', '-')}"
            f" (settings /set can change: {', '.join(SAMPLING_KEYS)})"
        )
    return spec.validate(raw)


def check_max_new_tokens(value: int, context_limit: int) -> int:
    """max_new_tokens must leave room for a prompt in the model's context window (UsageError, exit 2)."""
    if value >= context_limit:
        raise UsageError(
            f"max_new_tokens must be less than the model's context window ({context_limit:,} tokens), got {value}"
        )
    return value


# --------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class SamplingSettings:
    """What the engine needs to generate one answer. Validated on construction."""

    max_new_tokens: int = SPECS["max_new_tokens"].default  # type: ignore[assignment]
    temperature: float = SPECS["temperature"].default  # type: ignore[assignment]
    top_p: float = SPECS["top_p"].default  # type: ignore[assignment]
    top_k: int = SPECS["top_k"].default  # type: ignore[assignment]
    repetition_penalty: float = SPECS["repetition_penalty"].default  # type: ignore[assignment]
    seed: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, parse_setting(f.name, getattr(self, f.name)))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_resolved(cls, resolved: Mapping[str, Any]) -> SamplingSettings:
        return cls(**{key: resolved[key] for key in GENERATION_KEYS})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SamplingSettings:
        """From a dict such as ``Session.sampling``; missing keys take built-in defaults, other keys are ignored."""
        return cls(**{key: values[key] for key in GENERATION_KEYS if key in values})
