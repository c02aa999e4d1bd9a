"""The setting options of every command, generated from the one settings table (:data:`SPECS`).

``@setting_options("model", "temperature", …)`` adds ``--model/-m ID|PATH``, ``--temperature/-t T`` …
to a Typer command, with their help and defaults taken from the table, and hands the command the
values given on the command line as ``flags`` (None = not given), ready for
:func:`~bluelm_cli.config.settings.resolve_settings`. A new setting is one table row, not one option per command.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, Optional, TypeVar

import typer

from bluelm_cli.core.settings import SPECS, SettingSpec

F = TypeVar("F", bound=Callable[..., Any])

# Settings that every model-running command takes (`chat`, `ask`).
MODEL_SETTINGS = (
    "model", "source", "device", "dtype", "max_new_tokens", "temperature", "top_p", "top_k",
    "repetition_penalty", "seed", "system", "compile", "kv_cache", "quantize", "context_shift", "prompt_lookup", "api",
)


# Other spellings the command line takes (bluelm.cli.app translates them before parsing).
_OTHER_NAMES = {"max_new_tokens": "--new-tokens"}


def _help(spec: SettingSpec) -> str:
    if spec.type is bool:
        if spec.default is None:  # unset means something of its own, which the help says
            return spec.help
        return f"{spec.help.rstrip('.')} ({'on' if spec.default else 'off'})."
    extra = [f"also {_OTHER_NAMES[spec.name]}"] if spec.name in _OTHER_NAMES else []
    if spec.env:
        extra.append(f"env {spec.env}")
    if spec.default is not None:
        extra.append(f"default {spec.default}")
    return f"{spec.help.rstrip('.')} ({'; '.join(extra)})." if extra else spec.help


def _parameter(spec: SettingSpec) -> inspect.Parameter:
    if spec.type is bool:
        name = spec.flag.removeprefix("--")
        option = typer.Option(f"--{name}/--no-{name}", help=_help(spec), show_default=False)
        annotation: Any = Annotated[Optional[bool], option]
    else:
        decls = [spec.flag, *([spec.short] if spec.short else [])]
        option = typer.Option(*decls, help=_help(spec), metavar=spec.metavar, show_default=False)
        # Taken as text: the one parser (SPECS) validates it, with the same message as /set and the config file.
        annotation = Annotated[Optional[str], option]
    return inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


def setting_options(*names: str) -> Callable[[F], F]:
    """Add the named settings' options to a command, which receives them as ``flags: dict``."""

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in signature.parameters.values() if p.name != "flags"]
        generated = [_parameter(SPECS[name]) for name in names]
        # Settings first in --help, then the command's own options, as before.
        positional = [p for p in own if p.default is inspect.Parameter.empty or _is_argument(p)]
        rest = [p for p in own if p not in positional]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            flags = {name: kwargs.pop(name) for name in names}
            return command(flags=flags, **kwargs)

        parameters = positional + generated + rest
        wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper  # type: ignore[return-value]

    return decorate


def _is_argument(parameter: inspect.Parameter) -> bool:
    metadata = getattr(parameter.annotation, "__metadata__", ())
    return any(isinstance(item, typer.models.ArgumentInfo) for item in metadata)


class HelpCommand(typer.core.TyperCommand):
    """A command whose --help says what each value is and nothing of the framework's types: arguments as
    ``NAME`` (``[NAME]`` when optional), never ``NAME <str>``, ``{NAME}`` or ``[[NAME]]`` (typer's own)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(_argument_usage(param))
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                if not getattr(param, "hidden", False):
                    arguments.append((_argument_name(param), getattr(param, "help", None) or ""))
            else:
                record = param.get_help_record(ctx)
                if record is not None:
                    options.append(record)
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        if options:
            with formatter.section("Options"):
                formatter.write_dl(options)


def _argument_name(param: Any) -> str:
    name = (param.metavar or param.name or "").strip("[]").upper()
    return name if param.nargs == 1 or name.endswith("...") else f"{name}..."


def _argument_usage(param: Any) -> str:
    name = _argument_name(param)
    return name if param.required else f"[{name}]"
