"""From resolved settings to what a command talks to: the local model (loaded with a status line, or behind the
prompt) with its fast path, or a served one (`--api`). The commands in cli.py call these; so does nothing else.

Heavy modules (torch, transformers, the engine) are imported inside the functions, so `bluelm --help` stays instant.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from bluelm_cli.core.errors import UsageError
from bluelm_cli.core.secrets import redact_url
from bluelm_cli.config.settings import ResolvedSettings
from bluelm_cli.core.settings import SOURCE_FLAG, check_max_new_tokens

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.console import Console

    from bluelm_cli.core.backend import Backend
    from bluelm_cli.chat.background import LoadProgress
    from bluelm_cli.local.engine import ChatEngine
    from bluelm_cli.local.loading import LoadedModel


def shown_markup(text: str) -> str:
    """Outside text (a path, a model id, a loader's note) for a rich console: control characters and bidi
    overrides made visible (core.sanitize), then escaped so that "[…]" is not taken for markup."""
    from rich.markup import escape

    from bluelm_cli.core.sanitize import safe_for_terminal

    return escape(safe_for_terminal(text))


def quantization_choice(load_in_8bit: bool, load_in_4bit: bool) -> str | None:
    if load_in_8bit and load_in_4bit:
        raise UsageError("choose one of --load-in-8bit and --load-in-4bit")
    return "8bit" if load_in_8bit else "4bit" if load_in_4bit else None


def load_local(settings: ResolvedSettings, quantization: str | None, console: Console, *, chatting: bool = True,
               announce: bool = True, budget_may_shrink: bool = False) -> LoadedModel:
    """Load the model with a status line on stderr, then say how long it took (unless `announce` is off)."""
    from bluelm_cli.local.loading import load_model

    escape = shown_markup
    started = time.perf_counter()
    # Paths and ids may hold "[…]", which rich would take for markup: every interpolation is escaped.
    with console.status(f"Loading {escape(settings['model'])}…", spinner="dots") as status:
        loaded = load_model(
            **model_source(settings, quantization, chatting=chatting, budget_may_shrink=budget_may_shrink),
            on_status=lambda text: status.update(escape(text) + "…"),
            on_warning=lambda text: console.print(f"[yellow]Warning:[/] {escape(text)}"),
        )
    settings.apply_checkpoint_defaults(loaded.generation_defaults)
    if announce:
        console.print(f"[dim]{escape(loaded_line(loaded, time.perf_counter() - started))}[/]")
    return loaded


def model_source(settings: ResolvedSettings, quantization: str | None, *, chatting: bool = True,
                 budget_may_shrink: bool = False) -> dict[str, Any]:
    """What `load_model` is told about the model, whichever way it loads (with a status line or behind the
    prompt); a chat also has max_new_tokens checked against the model's context before the weights load,
    unless the budget may shrink to fit (`ask` without -n lowers it to what the context leaves)."""
    if budget_may_shrink and settings.source_of("max_new_tokens") != SOURCE_FLAG:
        chatting = False
    return {
        "model": settings["model"],
        "source": settings["source"],
        "device": settings["device"],
        "dtype": settings["dtype"],
        "quantization": quantization,
        "on_config": (lambda context: check_max_new_tokens(settings["max_new_tokens"], context)) if chatting else None,
    }


def loaded_line(loaded: LoadedModel, seconds: float) -> str:
    from bluelm_cli.local.loading import dtype_name

    weights = f", {loaded.weights_format}" if loaded.weights_format else ""
    return (f"Loaded {loaded.model_id} on {loaded.device} ({dtype_name(loaded.dtype)}, context {loaded.context_length:,}{weights})"
            f" in {seconds:.1f} s")


def load_engine_in_background(settings: ResolvedSettings, quantization: str | None, progress: LoadProgress) -> ChatEngine:
    """`load_local` + `local_engine` for a chat whose prompt is already up: progress goes to the status line."""
    from bluelm_cli.local.engine import ChatEngine
    from bluelm_cli.local.fastpath import make_runner
    from bluelm_cli.local.loading import load_model

    loaded = load_model(**model_source(settings, quantization), on_status=progress.status, on_warning=progress.warn)
    progress.note(loaded_line(loaded, progress.elapsed()))
    prepare_weights(loaded, settings, progress.note)
    runner = _int8_cache_runner(loaded, settings, progress.note) or make_runner(
        loaded, enabled=bool(settings["compile"]), on_status=progress.note)
    return ChatEngine(loaded, runner=runner, **engine_options(settings, runner))

def prepare_weights(loaded: LoadedModel, settings: ResolvedSettings, note: Callable[[str], None]) -> None:
    """Before a runner captures the model: q/k/v and gate/up fused into one matmul each (modeling.fuse_projections),
    then `--quantize` through torchao."""
    from bluelm_cli.modeling.modeling_bluelm import BlueLMForCausalLM, fuse_projections

    if isinstance(loaded.model, BlueLMForCausalLM):
        fuse_projections(loaded.model)
    scheme = settings["quantize"]
    if scheme:
        from bluelm_cli.local.quantize import quantize_weights

        if loaded.quantization:
            raise UsageError(f"--quantize {scheme} and --load-in-8bit/--load-in-4bit are two quantizations; choose one")
        started = time.perf_counter()
        loaded.quantization = quantize_weights(loaded.model, scheme)
        note(f"Quantized the weights ({loaded.quantization}) in {time.perf_counter() - started:.1f} s")


def engine_options(settings: ResolvedSettings, runner: object) -> dict[str, bool]:
    """The engine's switches from the settings: context shift and prompt lookup.

    Prompt lookup, unset, is on for the eager runner only: measured on a CPU (BENCHMARKS.md, 2026-12-06) it
    decoded 1.37x faster where text repeats and 1.00x where nothing matched; under sampling (exact speculative
    sampling) 1.32x at T 0.1 and 0.97-1.00x where no draft was kept, so it is on for sampled answers too. On the CUDA fast path a draft is
    verified by an eager forward (not a graph replay) and the next step is no longer queued before the host reads
    the token; the GPU check measures that, and until it has, the fast path decodes plainly unless asked."""
    from bluelm_cli.local.engine import StepRunner

    lookup = settings["prompt_lookup"]
    return {"context_shift": bool(settings["context_shift"]),
            "prompt_lookup": type(runner) is StepRunner if lookup is None else bool(lookup)}


def local_engine(loaded: LoadedModel, settings: ResolvedSettings, console: Console, runner_kind: str | None = None,
                 *, announce: bool = True, prefill_graph: bool | None = None) -> ChatEngine:
    from bluelm_cli.local.engine import ChatEngine
    from bluelm_cli.local.fastpath import DEFAULT_RUNNER, make_runner

    escape = shown_markup

    def note(text: str) -> None:
        console.print(f"[dim]{escape(text)}[/]")

    prepare_weights(loaded, settings, note if announce else lambda text: None)  # "Quantized …": -v in `ask`
    runner = _int8_cache_runner(loaded, settings, note) or make_runner(
        loaded, enabled=bool(settings["compile"]), kind=runner_kind or DEFAULT_RUNNER, on_status=note, prefill_graph=prefill_graph)
    return ChatEngine(loaded, runner=runner, **engine_options(settings, runner))


def _int8_cache_runner(loaded: LoadedModel, settings: ResolvedSettings, note: Any) -> Any:
    """The eager runner over an int8 KV cache when `kv_cache = int8`, else None (the usual fast path or eager).

    The CUDA fast path preallocates a static cache in the model's dtype, so the int8 cache decodes eagerly."""
    if settings["kv_cache"] != "int8":
        return None
    from bluelm_cli.local.engine import StepRunner

    if loaded.device.type == "cuda" and settings["compile"]:
        note("The KV cache is int8: decoding on the eager path (the CUDA fast path keeps a cache in the model's dtype)")
    return StepRunner(loaded.model, kv_cache="int8")


KEY_ON_COMMAND_LINE = ("--api-key puts the key where every user of this machine can read it (ps, /proc); "
                       "set BLUELM_API_KEY or use --api-key-file PATH instead")


def api_key_from(flag: str | None, key_file: str | None = None) -> str | None:
    """--api-key, else --api-key-file, else BLUELM_API_KEY, else OPENAI_API_KEY (never printed). A key a
    header can't carry (a line break, a control character) is refused without being shown."""
    from bluelm_cli.remote.http import check_api_key

    candidates: list[tuple[str | None, str]] = [(flag, "--api-key")]
    if key_file:
        candidates.append((_read_key_file(key_file), f"the file {key_file}"))
    candidates += [(os.environ.get(name), name) for name in ("BLUELM_API_KEY", "OPENAI_API_KEY")]
    for value, source in candidates:
        if value and value.strip():
            check_api_key(value.strip(), source)
            return value.strip()
    return None


def _read_key_file(path: str) -> str:
    from pathlib import Path

    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8 text"
        raise UsageError(f"cannot read the API key file {path}: {reason}; check --api-key-file") from None
    # The first line is the key (as for `curl --oauth2-bearer $(cat FILE)`); a trailing newline is not part of it.
    key = text.split("\n", 1)[0].strip()
    if not key:
        raise UsageError(f"the API key file {path} is empty; write the key on its first line")
    return key


def _readable_by_others(path: str) -> bool:
    from pathlib import Path

    try:
        return bool(Path(path).expanduser().stat().st_mode & 0o044)  # as ssh warns of a private key's mode
    except OSError:
        return False


def api_key_source(flag: str | None) -> str | None:
    if flag and flag.strip():
        return SOURCE_FLAG
    return next((f"env {name}" for name in ("BLUELM_API_KEY", "OPENAI_API_KEY") if os.environ.get(name, "").strip()), None)


def open_backend(settings: ResolvedSettings, quantization: str | None, api_key: str | None, console: Console,
                 api_key_file: str | None = None, *, announce: bool = True,
                 budget_may_shrink: bool = False) -> tuple[Backend, str]:
    """The served model (`--api`) or the local one, and its id for the session. `announce` off: no
    "Loaded …"/"Connected to …" line (`ask` without -v)."""
    if not settings["api"]:
        loaded = load_local(settings, quantization, console, announce=announce, budget_may_shrink=budget_may_shrink)
        return local_engine(loaded, settings, console, announce=announce), loaded.model_id
    from rich.markup import escape

    from bluelm_cli.remote import connect

    if quantization or settings["quantize"]:
        raise UsageError("--load-in-8bit/--load-in-4bit/--quantize apply to a local model; the server decides how it runs with --api")
    # With --api, --model names the served model; a model from the environment or config file is a local one.
    model = settings["model"] if settings.source_of("model") == SOURCE_FLAG else None
    key = api_key_from(api_key, api_key_file)
    if api_key and api_key.strip():
        console.print(f"[yellow]Warning:[/] {escape(KEY_ON_COMMAND_LINE)}")
    elif api_key_file and _readable_by_others(api_key_file):
        console.print(f"[yellow]Warning:[/] {escape(f'other users can read the API key file {api_key_file}; chmod 600 {api_key_file}')}")
    with console.status(f"Connecting to {escape(redact_url(settings['api']))}…", spinner="dots"):
        backend = connect(settings["api"], api_key=key, model=model, local_tokenizer=model)
    if announce:
        proxy = backend.client.proxy  # printed without its credentials
        through = f" through the proxy {proxy} (from {proxy.source})" if proxy else ""
        console.print(
            f"[dim]Connected to {escape(backend.client.url.api)}{escape(through)}: {escape(backend.model.name)}, context "
            f"{backend.context_limit:,} ({escape(backend.model.context_source)}), tokens counted {escape(backend.counting)}[/]"
        )
    return backend, backend.model.name
