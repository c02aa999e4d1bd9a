"""`bluelm export`: a BlueLM checkpoint as plain Llama for other engines (an HF folder or one GGUF file).

The export is staged in a temporary folder of its own, made next to OUT with a unique name, and moved to OUT
only when complete: no path the user made (an `OUT.partial`, the source) is ever written, moved or removed,
and the temporary is removed whatever ends the export (an error, Ctrl-C, SIGTERM, SIGHUP).
Everything that can be known before the work (OUT, its folder, the free space) is checked first.

May import: core, config, modeling, local (its loader).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bluelm_cli.core.errors import BlueLMError, UsageError

__all__ = ["FORMATS", "export_checkpoint", "needed_bytes"]

FORMATS = ("hf", "gguf")
_DTYPES = ("auto", "bfloat16", "float16", "float32")
_ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Signals whose default action ends the process without running `finally`; they remove the temporary first.
_ENDING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, name))
_SLACK_BYTES = 16 * 1024**2  # tokenizer.json, README, config files and file-system overhead


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
    config = check_checkpoint_folder(folder)
    parent = _nearest_existing(out.parent)
    _check_space(parent, folder, config, dtype, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _temporary_next_to(out) as staging:
        staged = staging / out.name
        try:
            if format == "hf":
                from bluelm_cli.export.hf import export_hf

                export_hf(folder, staged, dtype=dtype, on_status=on_status, dequantize=dequantize, on_note=on_note)
            else:
                from bluelm_cli.export.gguf_file import export_gguf

                export_gguf(folder, staged, dtype=dtype, on_status=on_status, on_note=on_note, on_warning=on_warning)
            _check_out(out, format)  # OUT may have appeared meanwhile: never replace what someone else wrote
            staged.replace(out)  # an empty OUT folder is replaced too
        except Exception as error:
            from bluelm_cli.modeling.quantized import UnsupportedQuantization

            if isinstance(error, UnsupportedQuantization):  # found while dequantising a layer: one line, no traceback
                raise BlueLMError(f"{folder}: {error}") from None
            if isinstance(error, BlueLMError):
                raise
            from bluelm_cli.local.loading import weight_file_problem

            problem = weight_file_problem(folder)  # a truncated shard fails as a "write" or a RuntimeError
            if problem is not None:
                raise BlueLMError(problem) from None
            if not _is_write_failure(error):
                raise
            raise BlueLMError(f"cannot write {out} ({_reason(error)}); free some space or choose another OUT") from None
    return out


def needed_bytes(folder: Path, config: dict[str, Any], dtype: str) -> int:
    """About what the export writes: the source's weight files scaled from its dtype to the export's."""
    weights = sum(
        path.stat().st_size for path in folder.iterdir()
        if path.is_file() and path.name.endswith((".safetensors", ".bin")) and not path.name.endswith(".index.json")
    )
    source_dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    source_bytes = _ELEMENT_BYTES.get(source_dtype, 2)
    target_bytes = _ELEMENT_BYTES.get(source_dtype if dtype == "auto" else dtype, source_bytes)
    return weights * target_bytes // source_bytes + _SLACK_BYTES


class _Ended(BaseException):
    """An ending signal arrived; raised so that the temporary is removed before the process ends by it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _temporary_next_to(out: Path) -> Iterator[Path]:
    """A new folder of our own beside `out` (same file system, so the final move is a rename), removed at the
    end of the block, including when an ending signal arrives; the process then ends by that signal."""
    first_signal: list[int] = []
    removing = threading.Event()

    def end(signum: int, frame: object) -> None:
        first_signal.append(signum)
        if len(first_signal) == 1 and not removing.is_set():  # nothing may cut the removal short
            raise _Ended(signum)

    with _on_ending_signals(end):
        try:
            staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".bluelm-export"))
            try:
                yield staging
            finally:
                removing.set()
                shutil.rmtree(staging, ignore_errors=True)
        except _Ended:
            pass
    if first_signal:
        signal.raise_signal(first_signal[0])  # now the previous handler: by default the process ends by the signal
        raise KeyboardInterrupt  # a handler that did not end the process: the export stops all the same


@contextmanager
def _on_ending_signals(handler: Callable[[int, object], None]) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only the main thread sets handlers
        yield
        return
    previous = {}
    for signum in _ENDING_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:  # `nohup` asked to ignore SIGHUP: keep it ignored
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _is_write_failure(error: Exception) -> bool:
    # safetensors reports a failed write as its own error type, with the OS error in the text.
    return isinstance(error, OSError) or type(error).__name__ == "SafetensorError"


def _reason(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    if isinstance(error, OSError):  # gguf's short write: "38400 requested and 12592 written"
        return f"a write was cut short: {error}"
    return re.sub(r" \(os error \d+\)$", "", str(error).rsplit("I/O error: ", 1)[-1])


def _nearest_existing(folder: Path) -> Path:
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _check_out(out: Path, format: str) -> None:
    if out.is_symlink():
        raise BlueLMError(f"{out} is a symbolic link; give a new path for OUT, not a link")
    resolved = out.resolve()
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current folder was removed: OUT cannot be it
        cwd = None
    if cwd is not None and (resolved == cwd or resolved in cwd.parents):
        raise BlueLMError(f"{out} is the current folder or holds it; give a new folder for OUT, e.g. ./BlueLM-7B-Chat-llama")
    if format == "hf":
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise BlueLMError(f"{out} already exists and is not an empty folder; choose a new OUT folder")
    elif out.exists():
        raise BlueLMError(f"{out} already exists; choose a new OUT file name (e.g. BlueLM-7B-Chat.gguf)")
    parent = _nearest_existing(out.parent)
    if not parent.is_dir():
        raise BlueLMError(f"{parent} is not a folder; choose an OUT inside a folder")
    try:  # a real try, not os.access: root passes every permission check yet cannot write a read-only mount
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".bluelm-export-check."))
    except OSError as error:
        raise BlueLMError(f"cannot write in {parent} ({error.strerror}); choose an OUT in a folder you can write") from None


def _check_space(parent: Path, folder: Path, config: dict[str, Any], dtype: str, out: Path) -> None:
    needed = needed_bytes(folder, config, dtype)
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise BlueLMError(
            f"{parent} has {_size(free)} free and the export of {folder.name} needs about {_size(needed)}; "
            "free some space or choose another OUT"
        )


def _size(count: int) -> str:
    for unit, scale in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"
