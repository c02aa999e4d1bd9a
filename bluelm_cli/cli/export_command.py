"""`bluelm export`: the model as plain Llama (a Hugging Face folder or one GGUF file) for other engines."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from bluelm_cli.cli.common import DebugOpt, _resolve, _stderr_console
from bluelm_cli.cli.options import setting_options
from bluelm_cli.core.errors import BlueLMError, ExitStatus


@setting_options("model", "source")
def export(
    out: Annotated[Path, typer.Argument(help="New folder (hf) or file (gguf) to write.", metavar="OUT", show_default=False)],
    *,
    flags: dict[str, Any],
    export_format: Annotated[Optional[str], typer.Option("--format", help="hf (a folder) or gguf (one file); default: gguf when OUT ends in .gguf, else hf.", metavar="FORMAT", show_default=False)] = None,
    dtype: Annotated[str, typer.Option(help="auto (the checkpoint's), bfloat16, float16 or float32.", metavar="DTYPE")] = "auto",
    dequantize: Annotated[bool, typer.Option(
        "--dequantize", help="Write an AWQ/GPTQ release's 4-bit layers as plain DTYPE weights instead of keeping them.")] = False,
    debug: DebugOpt = False,
) -> int:
    """Write the model as plain Llama (no remote code) for other engines; see the README's "Exporting to other engines"."""
    from bluelm_cli.cli.startup import shown_markup as escape
    from bluelm_cli.core.sanitize import safe_for_terminal
    from bluelm_cli.export import export_checkpoint

    settings, _ = _resolve(flags)
    if export_format is None:  # the file name says it: `bluelm export model.gguf`
        export_format = "gguf" if out.suffix.lower() == ".gguf" else "hf"
    if export_format == "gguf":
        import importlib.util

        if importlib.util.find_spec("gguf") is None:  # an extra, not installed by `pip install .`
            raise BlueLMError("GGUF export needs the gguf package: pip install 'bluelm-cli[export]' (or pip install gguf)")
    console = _stderr_console()
    with console.status(f"Exporting {escape(settings['model'])}…", spinner="dots") as status:
        written = export_checkpoint(
            settings["model"], out, format=export_format, dtype=dtype, source=settings["source"],
            on_status=lambda text: status.update(escape(text) + "…"), dequantize=dequantize,
            on_note=lambda text: console.print(f"[dim]Note: {escape(safe_for_terminal(text))}[/]"),
            on_warning=lambda text: console.print(f"[yellow]Warning:[/] {escape(safe_for_terminal(text))}"),
        )
    sys.stdout.write(safe_for_terminal(f"Exported {settings['model']} to {written} ({export_format})") + "\n")
    return ExitStatus.OK
