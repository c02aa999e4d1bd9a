"""`bluelm export`: a BlueLM checkpoint as plain Llama for other engines (an HF folder or one GGUF file)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bluelm_cli.errors import BlueLMError, UsageError

__all__ = ["FORMATS", "export_checkpoint"]

FORMATS = ("hf", "gguf")
_DTYPES = ("auto", "bfloat16", "float16", "float32")


def export_checkpoint(
    model: str,
    out: Path,
    *,
    format: str = "hf",
    dtype: str = "auto",
    source: str = "huggingface",
    on_status: Callable[[str], None] | None = None,
) -> Path:
    """Export `model` (hub id or folder) to `out`: a folder for `hf`, a file for `gguf`. Returns what was written."""
    if format not in FORMATS:
        raise UsageError(f"unknown format '{format}'; use hf or gguf")
    if dtype not in _DTYPES:
        raise UsageError(f"unknown dtype '{dtype}'; use auto, bfloat16, float16 or float32")
    _check_out(out, format)
    from bluelm_cli.loading import check_checkpoint_folder, resolve_model_folder

    folder = resolve_model_folder(model, source, on_status)
    check_checkpoint_folder(folder)
    if format == "hf":
        from bluelm_cli.export.hf import export_hf

        export_hf(folder, out, dtype=dtype, on_status=on_status)
        return out
    from bluelm_cli.export.gguf_file import export_gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        export_gguf(folder, partial, dtype=dtype, on_status=on_status)
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def _check_out(out: Path, format: str) -> None:
    if format == "hf":
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise BlueLMError(f"{out} already exists and is not an empty folder; choose a new OUT folder")
    elif out.exists():
        raise BlueLMError(f"{out} already exists; choose a new OUT file name (e.g. BlueLM-7B-Chat.gguf)")
