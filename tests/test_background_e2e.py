"""`bluelm chat` on a terminal (pexpect) while its model loads in the background, with tiny real checkpoints:
the prompt comes before the model, an early message is answered once it is there, a damaged checkpoint
ends the chat with one line, and Ctrl-C / Ctrl-D during the load end it cleanly (no SIGABRT)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow

PROMPT = "> "
TIMEOUT = 90  # model loading on a busy 2-core machine


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("tiny"), TinySpec(weights_format="safetensors"))


@pytest.fixture(scope="module")
def damaged_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """config.json and the tokenizer are fine; the weights file is cut short."""
    folder = build_checkpoint(tmp_path_factory.mktemp("damaged"), TinySpec(weights_format="safetensors"))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def spawn(checkpoint: Path, home: Path) -> pexpect.spawn:
    env = {**os.environ, "BLUELM_HOME": str(home), "HF_HOME": str(home.parent / "hf"), "HF_HUB_OFFLINE": "1",
           "TERM": "xterm-256color", "PYTHONUNBUFFERED": "1"}
    return pexpect.spawn(
        sys.executable,
        ["-m", "bluelm_cli", "chat", "--model", str(checkpoint), "--temperature", "0", "--max-new-tokens", "12",
         "--session", "bg"],
        env=env, dimensions=(40, 120), encoding="utf-8", codec_errors="replace", timeout=TIMEOUT,
    )


def ended(child: pexpect.spawn) -> tuple[int | None, int | None, str]:
    child.expect(pexpect.EOF)
    rest = child.before
    child.close()
    return child.exitstatus, child.signalstatus, rest


def test_the_prompt_comes_before_the_model_and_an_early_message_is_answered(checkpoint: Path, tmp_path: Path) -> None:
    home = tmp_path / "bluelm"
    child = spawn(checkpoint, home)
    child.expect_exact("loading in the background")
    # The load starts once the prompt is drawn, so the prompt always comes first.
    assert child.expect_exact([PROMPT, "Loaded "]) == 0
    child.send("/set top_k 3\r")  # works at once
    child.expect_exact("top_k = 3")
    child.send("hello\r")
    assert child.expect_exact(["Waiting for the model", "Loaded "]) == 0  # sent before the model was there
    child.expect(r"Loaded \S+ on cpu \(float32, context 2,048\) in \d+\.\d s")
    child.expect_exact(PROMPT)  # after the answer
    child.send("/show\r")
    child.expect_exact("context")
    child.expect(r"\d+ / 2,048 tokens in use")
    child.expect_exact(PROMPT)
    child.sendeof()
    status, signal, rest = ended(child)
    assert (status, signal) == (0, None) and "Traceback" not in rest
    records = [json.loads(line) for line in (home / "sessions" / "bg.jsonl").read_text("utf-8").splitlines()]
    turns = [record for record in records if record["type"] == "turn"]
    assert [turn["user"] for turn in turns] == ["hello"] and turns[0]["answer_ids"]


def test_a_damaged_checkpoint_ends_the_chat_with_one_error_line(damaged_checkpoint: Path, tmp_path: Path) -> None:
    home = tmp_path / "bluelm"
    child = spawn(damaged_checkpoint, home)
    child.expect_exact(PROMPT)  # the user sits idle at the prompt: the error still ends the chat
    child.expect(r"Error: [^\r\n]*model\.safetensors is damaged[^\r\n]*")
    error_line = child.after
    status, signal, rest = ended(child)
    assert (status, signal) == (1, None)
    assert "Error:" not in rest and "Traceback" not in rest and "Error:" not in error_line[6:]
    assert not (home / "sessions" / "bg.jsonl").exists()  # nothing was said: no empty session is left


@pytest.mark.parametrize(("key", "expected"), [("\x03", 130), ("\x04", 0)])
def test_ctrl_c_or_ctrl_d_during_the_load_ends_the_chat_cleanly(checkpoint: Path, tmp_path: Path, key: str,
                                                                expected: int) -> None:
    child = spawn(checkpoint, tmp_path / "bluelm")
    child.expect_exact(PROMPT)
    child.send(key)  # the loader is importing torch or reading weights now
    status, signal, rest = ended(child)
    assert (status, signal) == (expected, None)  # not SIGABRT from the loader thread
    assert "Loaded " not in rest and "Traceback" not in rest and "Error" not in rest
