"""Settings shared by every command, where each value comes from, and their validation.

Precedence, highest first::

    command-line flag  >  environment  >  config file  >  checkpoint's generation_config.json  >  built-in default

:data:`SPECS` is the single table of settings; the CLI options and the REPL's ``/set KEY VALUE``
both validate through :func:`parse_setting`, nowhere else.

Config file
-----------
TOML, at ``$BLUELM_HOME/config.toml`` (or the platform's config directory, see
:mod:`bluelm_cli.config.paths`). Top-level keys are setting names; every key is optional::

    model = "/data/BlueLM-7B-Chat"     # Hugging Face / ModelScope id, or a local directory
    source = "modelscope"              # huggingface | modelscope
    device = "cuda:0"                  # auto | cuda | cuda:N | cpu
    dtype = "bfloat16"                 # auto | bfloat16 | float16 | float32
    max_new_tokens = 1024
    temperature = 0.3                  # 0..2, 0 = greedy
    top_p = 0.9                        # 0 < p <= 1
    top_k = 0                          # >= 0, 0 disables
    repetition_penalty = 1.1           # 1.0..2.0
    seed = 42                          # >= 0; leave out for a random seed
    system = "You are a concise assistant."   # placed before the first turn
    compile = true                     # CUDA fast path: static KV cache + CUDA-graph decode
    kv_cache = "int8"                  # model | int8 (keys/values in int8 with per-head scales)
    api = "http://localhost:8000/v1"   # chat with a served model (see the README's "Chatting with a served model")
    history = false                    # keep no input history file (bluelm chat --no-history)

Values may also be written as strings (``temperature = "0.3"``); they get the same checks as flags.
The environment variables are ``BLUELM_MODEL`` (the model) and ``BLUELM_API`` (a server's URL); the API
key is never a setting (it would show in ``bluelm config``): ``--api-key``, ``--api-key-file``, ``BLUELM_API_KEY`` or ``OPENAI_API_KEY``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bluelm_cli.core.errors import BlueLMError, UsageError
from bluelm_cli.core.settings import (
    SETTING_NAMES,
    SOURCE_CHECKPOINT,
    SOURCE_DEFAULT,
    SOURCE_FLAG,
    SPECS,
    SamplingSettings,
    get_spec,
    parse_setting,
    shown_value,
)

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


GENERATION_CONFIG = "generation_config.json"


def read_generation_config(folder: Path) -> tuple[dict[str, Any], list[str]]:
    """A checkpoint's generation_config.json, less the sampling values our settings would refuse, and a
    warning for each value left out (a bad file must not stop the model from loading)."""
    path = Path(folder) / GENERATION_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, []
    except (OSError, ValueError):
        return {}, [f"ignoring {path}: it is not valid JSON"]
    if not isinstance(data, dict):
        return {}, [f"ignoring {path}: it is not a JSON object"]
    warnings = []
    for key in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty"):
        if data.get(key) is None:
            continue
        try:
            parse_setting(key, data[key])
        except UsageError as exc:
            warnings.append(f"ignoring {key} in {path} ({exc})")
            del data[key]
    if "do_sample" in data and not isinstance(data["do_sample"], bool):
        warnings.append(f"ignoring do_sample in {path} (it must be true or false)")
        del data["do_sample"]
    return data, warnings


# --------------------------------------------------------------------------- config file
def _config_source(path: Path) -> str:
    return f"config file {path}"


def load_config_file(path: Path) -> dict[str, Any]:
    """The validated settings in a TOML config file; a missing file gives ``{}``.

    Invalid TOML, an unknown key or a bad value raise BlueLMError naming the file (and line or key).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except IsADirectoryError:
        raise BlueLMError(f"config file {path} is a directory; remove it or point BLUELM_HOME elsewhere") from None
    except NotADirectoryError:
        raise BlueLMError(
            f"{path.parent} is a file, not a folder; point BLUELM_HOME at a folder (or remove that file)"
        ) from None
    except OSError as exc:
        raise BlueLMError(f"cannot read config file {path}: {exc.strerror or exc}; check its permissions") from None
    try:
        table = tomllib.loads(data.decode("utf-8").removeprefix("\ufeff"))  # editors on Windows write a BOM
    except UnicodeDecodeError:
        raise BlueLMError(f"config file {path} is not UTF-8 text; save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise BlueLMError(f"config file {path} is not valid TOML: {exc}; fix that line") from None
    values: dict[str, Any] = {}
    for key, raw in table.items():
        if key in ("api_key", "api-key", "openai_api_key"):  # `bluelm config` lists it: say where it goes instead
            raise BlueLMError(
                f"config file {path}: the API key is not read from the config file; remove that line and put the key"
                " in BLUELM_API_KEY, or in a file of its own (chmod 600) given as --api-key-file"
            )
        if key not in SPECS:
            raise BlueLMError(
                f"config file {path}: unknown setting '{key}'; known settings: {', '.join(SETTING_NAMES)}"
            )
        try:
            values[key] = parse_setting(key, raw)
        except UsageError as exc:
            raise BlueLMError(f"config file {path}, key '{key}': {exc}") from None
    return values


# --------------------------------------------------------------------------- resolution
@dataclass(frozen=True)
class ResolvedValue:
    value: Any
    source: str


class ResolvedSettings:
    """Every setting's value and where it came from: ``resolved["temperature"]`` gives the value,
    ``resolved.source_of("temperature")`` where it came from."""

    def __init__(self, entries: Mapping[str, ResolvedValue]):
        missing = set(SPECS) - set(entries)
        if missing:
            raise ValueError(f"missing settings: {sorted(missing)}")
        self._entries: dict[str, ResolvedValue] = {name: entries[name] for name in SPECS}

    def __getitem__(self, name: str) -> Any:
        return self._entries[name].value

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={e.value!r} [{e.source}]" for n, e in self._entries.items())
        return f"ResolvedSettings({inner})"

    def source_of(self, name: str) -> str:
        return self._entries[name].source

    def sampling(self) -> SamplingSettings:
        return SamplingSettings.from_resolved(self)

    def use_model(self, model: str, source: str) -> None:
        """Take `model` from `source` (a resumed session's own model) in place of the resolved one."""
        self._entries["model"] = ResolvedValue(parse_setting("model", model), source)

    def apply_checkpoint_defaults(self, gen_config: Mapping[str, Any] | None) -> list[str]:
        """Take the checkpoint's generation_config.json values for settings still at their built-in
        default. ``do_sample: false`` there means greedy (temperature 0). Values outside our ranges
        are ignored. Changes this object in place; returns the names that changed."""
        if not gen_config:
            return []
        candidates: dict[str, Any] = {}
        for key in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty"):
            if gen_config.get(key) is not None:
                candidates[key] = gen_config[key]
        if gen_config.get("do_sample") is False:
            candidates["temperature"] = 0.0
        changed = []
        for key, raw in candidates.items():
            if self._entries[key].source != SOURCE_DEFAULT:
                continue
            try:
                value = parse_setting(key, raw)
            except UsageError:
                continue
            self._entries[key] = ResolvedValue(value, SOURCE_CHECKPOINT)
            changed.append(key)
        return changed


def resolve_settings(
    flags: Mapping[str, object | None],
    env: Mapping[str, str],
    config_file: Path,
) -> ResolvedSettings:
    """Combine flags (None = not given) > env > config file > built-in default, remembering sources.

    Bad flags raise UsageError; a bad config file raises BlueLMError.
    """
    for name in flags:
        get_spec(name)
    config = load_config_file(config_file)
    entries: dict[str, ResolvedValue] = {}
    for name, spec in SPECS.items():
        raw_flag = flags.get(name)
        if raw_flag is not None:
            entries[name] = ResolvedValue(spec.validate(raw_flag), SOURCE_FLAG)
            continue
        if spec.env and env.get(spec.env, "").strip():
            try:
                value = spec.validate(env[spec.env])
            except UsageError as exc:
                raise UsageError(f"environment variable {spec.env}: {exc}") from None
            entries[name] = ResolvedValue(value, f"env {spec.env}")
            continue
        if name in config:
            entries[name] = ResolvedValue(config[name], _config_source(Path(config_file)))
            continue
        entries[name] = ResolvedValue(spec.default, SOURCE_DEFAULT)
    return ResolvedSettings(entries)


def describe(resolved: ResolvedSettings) -> list[tuple[str, Any, str]]:
    """(name, value, source) for every setting, in table order, for ``bluelm config``."""
    return [(name, shown_value(name, resolved[name]), resolved.source_of(name)) for name in SPECS]
