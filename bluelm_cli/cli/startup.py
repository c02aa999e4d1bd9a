"""From resolved settings to what a command talks to: the local model (loaded with a status line, or behind the
prompt) with its fast path, or a served one (`--api`). The commands in cli.py call these; so does nothing else.

Heavy modules (torch, transformers, the engine) are imported inside the functions, so `bluelm --help` stays instant.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from bluelm_cli.core.errors import UsageError
from bluelm_cli.config.settings import ResolvedSettings
from bluelm_cli.core.settings import SOURCE_FLAG, check_max_new_tokens

if TYPE_CHECKING:
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


def load_local(settings: ResolvedSettings, quantization: str | None, console: Console, *, chatting: bool = True) -> LoadedModel:
    """Load the model with a status line on stderr, then say how long it took."""
    from bluelm_cli.local.loading import load_model

    escape = shown_markup
    started = time.perf_counter()
    # Paths and ids may hold "[…]", which rich would take for markup: every interpolation is escaped.
    with console.status(f"Loading {escape(settings['model'])}…", spinner="dots") as status:
        loaded = load_model(
            **model_source(settings, quantization, chatting=chatting),
            on_status=lambda text: status.update(escape(text) + "…"),
            on_warning=lambda text: console.print(f"[yellow]Warning:[/] {escape(text)}"),
        )
    settings.apply_checkpoint_defaults(loaded.generation_defaults)
    console.print(f"[dim]{escape(loaded_line(loaded, time.perf_counter() - started))}[/]")
    return loaded


def model_source(settings: ResolvedSettings, quantization: str | None, *, chatting: bool = True) -> dict[str, Any]:
    """What `load_model` is told about the model, whichever way it loads (with a status line or behind the
    prompt); a chat also has max_new_tokens checked against the model's context before the weights load."""
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

    return (f"Loaded {loaded.model_id} on {loaded.device} ({dtype_name(loaded.dtype)}, context {loaded.context_length})"
            f" in {seconds:.1f} s")


def load_engine_in_background(settings: ResolvedSettings, quantization: str | None, progress: LoadProgress) -> ChatEngine:
    """`load_local` + `local_engine` for a chat whose prompt is already up: progress goes to the status line."""
    from bluelm_cli.local.engine import ChatEngine
    from bluelm_cli.local.fastpath import make_runner
    from bluelm_cli.local.loading import load_model

    loaded = load_model(**model_source(settings, quantization), on_status=progress.status, on_warning=progress.warn)
    progress.note(loaded_line(loaded, progress.elapsed()))
    return ChatEngine(loaded, runner=make_runner(loaded, enabled=bool(settings["compile"]), on_status=progress.note))


def local_engine(loaded: LoadedModel, settings: ResolvedSettings, console: Console, runner_kind: str | None = None) -> ChatEngine:
    from bluelm_cli.local.engine import ChatEngine
    from bluelm_cli.local.fastpath import DEFAULT_RUNNER, make_runner

    escape = shown_markup
    runner = make_runner(loaded, enabled=bool(settings["compile"]), kind=runner_kind or DEFAULT_RUNNER,
                         on_status=lambda text: console.print(f"[dim]{escape(text)}[/]"))
    return ChatEngine(loaded, runner=runner)


def api_key_from(flag: str | None) -> str | None:
    """--api-key, else BLUELM_API_KEY, else OPENAI_API_KEY (never printed)."""
    for value in (flag, os.environ.get("BLUELM_API_KEY"), os.environ.get("OPENAI_API_KEY")):
        if value and value.strip():
            return value.strip()
    return None


def api_key_source(flag: str | None) -> str | None:
    if flag and flag.strip():
        return SOURCE_FLAG
    return next((f"env {name}" for name in ("BLUELM_API_KEY", "OPENAI_API_KEY") if os.environ.get(name, "").strip()), None)


def open_backend(settings: ResolvedSettings, quantization: str | None, api_key: str | None, console: Console) -> tuple[Backend, str]:
    """The served model (`--api`) or the local one, and its id for the session."""
    if not settings["api"]:
        loaded = load_local(settings, quantization, console)
        return local_engine(loaded, settings, console), loaded.model_id
    from rich.markup import escape

    from bluelm_cli.remote import connect

    if quantization:
        raise UsageError("--load-in-8bit/--load-in-4bit apply to a local model; the server decides how it runs with --api")
    # With --api, --model names the served model; a model from the environment or config file is a local one.
    model = settings["model"] if settings.source_of("model") == SOURCE_FLAG else None
    with console.status(f"Connecting to {escape(settings['api'])}…", spinner="dots"):
        backend = connect(settings["api"], api_key=api_key_from(api_key), model=model, local_tokenizer=model)
    console.print(
        f"[dim]Connected to {escape(backend.client.url.api)}: {escape(backend.model.name)}, context "
        f"{backend.context_limit} ({escape(backend.model.context_source)}), tokens counted {escape(backend.counting)}[/]"
    )
    return backend, backend.model.name
