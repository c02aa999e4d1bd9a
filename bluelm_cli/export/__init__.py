"""`bluelm export`: a BlueLM checkpoint as plain Llama for other engines (an HF folder or one GGUF file).

May import: core, config, modeling, local (its loader).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

from bluelm_cli.core.errors import BlueLMError, UsageError

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
    dequantize: bool = False,
    on_note: Callable[[str], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> Path:
    """Export `model` (hub id or folder) to `out`: a folder for `hf`, a file for `gguf`. Returns what was written.

    A quantized release (Chat-32K-AWQ/-GPTQ) keeps its 4-bit linears in an `hf` export where vLLM reads them exactly,
    unless `dequantize`; otherwise (Chat-4bits, GGUF) they are dequantised, and `on_note` says so."""
    if format not in FORMATS:
        raise UsageError(f"unknown format '{format}'; use hf or gguf")
    if dtype not in _DTYPES:
        raise UsageError(f"unknown dtype '{dtype}'; use auto, bfloat16, float16 or float32")
    _check_out(out, format)
    from bluelm_cli.local.loading import check_checkpoint_folder, resolve_model_folder

    folder = resolve_model_folder(model, source, on_status)
    check_checkpoint_folder(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")  # nothing half-written is ever left at OUT
    try:
        if format == "hf":
            from bluelm_cli.export.hf import export_hf

            export_hf(folder, partial, dtype=dtype, on_status=on_status, dequantize=dequantize, on_note=on_note)
        else:
            from bluelm_cli.export.gguf_file import export_gguf

            export_gguf(folder, partial, dtype=dtype, on_status=on_status, on_note=on_note, on_warning=on_warning)
        partial.replace(out)  # an empty OUT folder is replaced too
    except Exception as error:
        from bluelm_cli.modeling.quantized import UnsupportedQuantization

        if isinstance(error, UnsupportedQuantization):  # found while dequantising a layer: one line, no traceback
            raise BlueLMError(f"{folder}: {error}") from None
        if isinstance(error, BlueLMError) or not _is_write_failure(error):
            raise
        raise BlueLMError(f"cannot write {out} ({_reason(error)}); free some space or choose another OUT") from None
    finally:
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
    return out


def _is_write_failure(error: Exception) -> bool:
    # safetensors reports a failed write as its own error type, with the OS error in the text.
    return isinstance(error, OSError) or type(error).__name__ == "SafetensorError"


def _reason(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    if isinstance(error, OSError):  # gguf's short write: "38400 requested and 12592 written"
        return f"a write was cut short: {error}"
    return re.sub(r" \(os error \d+\)$", "", str(error).rsplit("I/O error: ", 1)[-1])


def _check_out(out: Path, format: str) -> None:
    if format == "hf":
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise BlueLMError(f"{out} already exists and is not an empty folder; choose a new OUT folder")
    elif out.exists():
        raise BlueLMError(f"{out} already exists; choose a new OUT file name (e.g. BlueLM-7B-Chat.gguf)")
