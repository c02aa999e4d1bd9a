"""`bluelm chat` end to end in a real pseudo-terminal (pexpect) with a tiny real checkpoint.

What a user does: type a message and watch it stream, stop a long answer with Ctrl-C and keep
chatting, /save, /reset, /exit; and a session killed by SIGHUP mid-conversation comes back whole
with --resume.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow

PROMPT = "> "
TIMEOUT = 60  # generous: model loading on a busy 2-core machine


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("tiny"), TinySpec())


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "bluelm"


def spawn(checkpoint: Path, home: Path, *args: str, max_new_tokens: int = 40, prompt: bool = True,
          preexec_fn: Callable[[], None] | None = None) -> pexpect.spawn:
    """Start `bluelm chat` and wait for the banner (and, unless told otherwise, the first prompt)."""
    env = {
        **os.environ,
        "BLUELM_HOME": str(home),
        "HF_HOME": str(home.parent / "hf"),
        "HF_HUB_OFFLINE": "1",
        "TERM": "xterm-256color",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("NO_COLOR", None)
    child = pexpect.spawn(
        sys.executable,
        ["-m", "bluelm_cli", "chat", "--model", str(checkpoint), "--temperature", "0",
         "--max-new-tokens", str(max_new_tokens), *args],
        env=env,
        dimensions=(40, 120),
        encoding="utf-8",
        codec_errors="replace",
        timeout=TIMEOUT,
        preexec_fn=preexec_fn,
    )
    child.expect("BlueLM chat")
    if prompt:
        wait_for_prompt(child)
    return child


def wait_for_prompt(child: pexpect.spawn) -> None:
    child.expect_exact(PROMPT)


def shown_so_far(child: pexpect.spawn) -> str:
    """Everything the child has written up to now (read without waiting)."""
    text = child.buffer
    while True:
        try:
            text += child.read_nonblocking(65536, timeout=0)
        except (pexpect.TIMEOUT, pexpect.EOF):
            return text


def assert_mid_answer(child: pexpect.spawn) -> None:
    """The answer is still streaming now: its end (the cut-off note) has not been written yet."""
    so_far = shown_so_far(child)
    child.buffer = so_far  # put it back for the expectations that follow
    assert child.isalive() and "[cut off" not in so_far, "the answer ended before the keys were sent"


def send(child: pexpect.spawn, line: str) -> None:
    """Type a line and press Enter (a carriage return, as a terminal sends)."""
    child.send(line + "\r")


def journal_turns(home: Path, name: str) -> list[dict]:
    lines = (home / "sessions" / f"{name}.jsonl").read_text("utf-8").splitlines()
    return [record for record in map(json.loads, lines) if record["type"] == "turn"]


def finish(child: pexpect.spawn) -> int:
    send(child, "/exit")
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def test_chat_streams_stops_saves_resets_and_exits(checkpoint: Path, home: Path, tmp_path: Path) -> None:
    child = spawn(checkpoint, home, "--session", "e2e", max_new_tokens=2000)
    try:
        # 1. A short answer streams in, then the prompt returns.
        send(child, "/set max_new_tokens 40")
        child.expect_exact("max_new_tokens = 40")
        send(child, "hello there")
        child.expect(r"\[cut off at max_new_tokens")
        wait_for_prompt(child)
        (first,) = journal_turns(home, "e2e")
        assert first["user"] == "hello there" and len(first["answer_ids"]) == 40

        # 2. A long answer is stopped by Ctrl-C; the partial answer is kept, marked, and chatting goes on.
        send(child, "/set max_new_tokens 1900")
        child.expect_exact("max_new_tokens = 1900")
        send(child, "tell me a very long story")
        child.expect_exact("thinking")  # the spinner: the answer has started
        child.sendintr()
        child.expect_exact("[interrupted]", timeout=10)
        wait_for_prompt(child)
        interrupted = journal_turns(home, "e2e")[-1]
        assert interrupted["finish_reason"] == "interrupted"
        assert 0 < len(interrupted["answer_ids"]) < 1900
        send(child, "/set max_new_tokens 40")
        send(child, "and now a short one")
        child.expect(r"\[cut off at max_new_tokens")
        wait_for_prompt(child)
        assert [t["user"] for t in journal_turns(home, "e2e")] == [
            "hello there", "tell me a very long story", "and now a short one"
        ]

        # 3. /save writes the conversation; /reset starts over.
        target = tmp_path / "saved.json"
        send(child, f"/save {target}")
        child.expect_exact("Saved to")
        wait_for_prompt(child)
        saved = json.loads(target.read_text("utf-8"))
        assert [t["user"] for t in saved["turns"]] == [
            "hello there", "tell me a very long story", "and now a short one"
        ]
        assert saved["turns"][1]["finish_reason"] == "interrupted"
        assert saved["model_id"] == str(checkpoint) and saved["sampling"]["max_new_tokens"] == 40
        send(child, "/reset")
        child.expect(r"New session \S+; settings kept\.")  # the earlier turns stay in their own session
        wait_for_prompt(child)
        send(child, "/show")
        child.expect(r"0 turns, 0 in the context")
        wait_for_prompt(child)

        # 4. /exit ends with status 0.
        assert finish(child) == 0
    finally:
        child.close(force=True)


def test_sighup_mid_conversation_then_resume_shows_every_turn(checkpoint: Path, home: Path) -> None:
    child = spawn(checkpoint, home, "--session", "hup")
    messages = ["first question", "second question"]
    try:
        for message in messages:
            send(child, message)
            child.expect(r"\[cut off at max_new_tokens")
            wait_for_prompt(child)
        child.send("a message being typed")  # not sent: the hangup comes first
        child.kill(signal.SIGHUP)
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    turns = journal_turns(home, "hup")
    assert [t["user"] for t in turns] == messages

    for resume, follow_up in ((["--resume", "hup"], "third question"), (["--resume"], "fourth question")):
        child = spawn(checkpoint, home, *resume, prompt=False)
        try:
            child.expect_exact(f"Resumed session hup: {len(messages)} earlier turns")
            for message in messages:  # the earlier turns are replayed, in order, each with its answer
                child.expect_exact(message)
                child.expect_exact("[cut off at max_new_tokens")
            wait_for_prompt(child)
            send(child, follow_up)
            child.expect(r"\[cut off at max_new_tokens")
            wait_for_prompt(child)
            assert finish(child) == 0
        finally:
            child.close(force=True)
        messages.append(follow_up)
        assert [t["user"] for t in journal_turns(home, "hup")] == messages


def test_sighup_during_an_answer_keeps_the_partial_answer(checkpoint: Path, home: Path) -> None:
    child = spawn(checkpoint, home, "--session", "hup-mid", max_new_tokens=1900)
    try:
        send(child, "tell me a very long story")
        child.expect_exact("thinking")  # the answer has started
        child.kill(signal.SIGHUP)  # the SSH connection drops mid-answer
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    (turn,) = journal_turns(home, "hup-mid")
    assert turn["user"] == "tell me a very long story"
    assert turn["finish_reason"] == "interrupted" and 0 < len(turn["answer_ids"]) < 1900


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGQUIT], ids=["SIGTERM", "SIGQUIT (Ctrl-\\)"])
def test_a_signal_during_an_answer_journals_it_and_exits_128_plus_n(checkpoint: Path, home: Path, signum: int) -> None:
    child = spawn(checkpoint, home, "--session", "term-mid", max_new_tokens=1900)
    try:
        send(child, "tell me a very long story")
        child.expect_exact("thinking")
        child.kill(signum)
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 128 + signum  # supervisors see the signal
    finally:
        child.close(force=True)
    (turn,) = journal_turns(home, "term-mid")
    assert turn["finish_reason"] == "interrupted"


def test_sigterm_at_the_prompt_restores_the_terminal(checkpoint: Path, home: Path) -> None:
    """prompt_toolkit turns echo and line editing off while it waits; a SIGTERM there must not leave them off."""
    env = {**os.environ, "BLUELM_HOME": str(home), "HF_HUB_OFFLINE": "1", "TERM": "xterm-256color"}
    command = (
        f"{sys.executable} -m bluelm_cli chat --model {checkpoint} --session term-idle; "
        "echo STATUS=$?; stty -a; echo STTY-DONE"
    )
    child = pexpect.spawn("bash", ["-c", command], env=env, dimensions=(40, 120), encoding="utf-8",
                          codec_errors="replace", timeout=TIMEOUT)
    try:
        child.expect("BlueLM chat")
        wait_for_prompt(child)
        chat_pid = int(subprocess.run(["pgrep", "-P", str(child.pid)], capture_output=True, text=True,
                                      check=True).stdout.split()[0])
        os.kill(chat_pid, signal.SIGTERM)
        child.expect(r"STATUS=(\d+)")
        assert int(child.match.group(1)) == 128 + signal.SIGTERM
        child.expect_exact("STTY-DONE")
        modes = child.before.split()
        assert "icanon" in modes and "echo" in modes, child.before  # not -icanon / -echo
    finally:
        child.close(force=True)


def test_keys_typed_during_an_answer_wait_for_the_next_prompt(checkpoint: Path, home: Path) -> None:
    child = spawn(checkpoint, home, "--session", "typeahead", max_new_tokens=300)
    try:
        send(child, "tell me something")
        child.expect_exact("thinking")
        child.expect(r"\w{3}")  # answer text is streaming
        assert_mid_answer(child)
        child.send("zq9x")  # typed while the answer streams: not echoed into it
        child.expect(r"\[cut off at max_new_tokens")
        assert "zq9x" not in child.before
        wait_for_prompt(child)
        child.expect_exact("zq9x")  # ... but waiting at the next prompt, as in a shell
        child.send("\r")
        child.expect(r"\[cut off at max_new_tokens")
        wait_for_prompt(child)
        assert [t["user"] for t in journal_turns(home, "typeahead")] == ["tell me something", "zq9x"]
        assert finish(child) == 0
    finally:
        child.close(force=True)


def test_resize_mid_answer_keeps_streaming_and_journals_it_whole(checkpoint: Path, home: Path) -> None:
    child = spawn(checkpoint, home, "--session", "winch", max_new_tokens=300)
    try:
        send(child, "tell me a long story")
        child.expect_exact("thinking")
        child.expect(r"\w{3}")  # answer text is streaming
        assert_mid_answer(child)
        child.setwinsize(30, 60)  # SIGWINCH mid-answer, narrower: the terminal reflows the live region
        child.expect(r"\[cut off at max_new_tokens")
        _answer_again_and_check_both_journaled(child, home, "winch")
        assert finish(child) == 0
    finally:
        child.close(force=True)


def _answer_again_and_check_both_journaled(child: pexpect.spawn, home: Path, session: str) -> None:
    """After a disturbed 300-token answer: the chat reaches its prompt, answers again, and journaled both whole."""
    wait_for_prompt(child)
    send(child, "tell me a long story")
    child.expect(r"\[cut off at max_new_tokens")
    wait_for_prompt(child)
    turns = journal_turns(home, session)
    assert [t["user"] for t in turns] == ["tell me a long story"] * 2
    assert turns[0]["finish_reason"] == "length" and len(turns[0]["answer_ids"]) == 300


def test_ctrl_z_mid_answer_gives_the_shell_a_clean_terminal_and_fg_resumes(checkpoint: Path, home: Path) -> None:
    """Real job control: an interactive bash runs the chat (a pexpect child alone is an orphaned process
    group, where the kernel discards SIGTSTP)."""
    env = {**os.environ, "BLUELM_HOME": str(home), "HF_HUB_OFFLINE": "1", "TERM": "xterm-256color", "PS1": "SHELL$ "}
    env.pop("NO_COLOR", None)
    child = pexpect.spawn("bash", ["--norc", "--noprofile", "-i"], env=env, dimensions=(40, 120), encoding="utf-8",
                          codec_errors="replace", timeout=TIMEOUT)
    try:
        child.expect_exact("SHELL$ ")
        send(child, f"{sys.executable} -m bluelm_cli chat --model {checkpoint} --temperature 0"
                    " --max-new-tokens 300 --session tstp")
        child.expect("BlueLM chat")
        wait_for_prompt(child)
        send(child, "tell me a long story")
        child.expect_exact("thinking")
        child.expect(r"\w{3}")
        child.buffer = shown_so_far(child)  # mid-answer (bash runs the chat: no isalive to ask)
        assert "[cut off" not in child.buffer
        child.send("\x1a")  # Ctrl-Z
        child.expect_exact("Stopped")
        child.expect_exact("SHELL$ ")
        send(child, "stty -a | grep -o -- ' -\\?echo ' ; echo MODES-DONE")
        child.expect_exact("MODES-DONE\r\n")  # the command's own echo is itself proof that echo is back on
        assert " -echo " not in child.before
        send(child, "fg")
        child.expect(r"\[cut off at max_new_tokens")
        _answer_again_and_check_both_journaled(child, home, "tstp")
        send(child, "/exit")
        child.expect_exact("SHELL$ ")
        send(child, "exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)


def test_ask_on_a_terminal_does_not_echo_keys_typed_while_it_answers(checkpoint: Path, home: Path) -> None:
    """`bluelm ask` on a terminal draws a live region too: keys typed meanwhile were echoed into it (and a
    Ctrl-Z/`fg` drew over the shell's lines). The answer's terminal handling is the chat's now."""
    env = {**os.environ, "BLUELM_HOME": str(home), "HF_HUB_OFFLINE": "1", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    child = pexpect.spawn(sys.executable, ["-m", "bluelm_cli", "ask", "--model", str(checkpoint), "--temperature", "0",
                                           "--max-new-tokens", "300", "-v", "tell me a long story"],
                          env=env, dimensions=(40, 120), encoding="utf-8", codec_errors="replace", timeout=TIMEOUT)
    try:
        child.expect(r"Loaded [^\n]* in [\d.]+ s")
        child.expect(r"\w{3}")  # the answer is streaming
        assert child.isalive()  # ... and not over: ask exits when it is
        child.send("zqzqzq")
        child.expect(pexpect.EOF)
        assert "zqzqzq" not in child.before
        child.close()
        assert child.exitstatus == 0
    finally:
        child.close(force=True)


def test_a_chat_started_under_nohup_ignores_sighup(checkpoint: Path, home: Path) -> None:
    """`nohup bluelm chat` asks for SIGHUP to be ignored; the chat's own handlers ended it anyway (exit 129)."""
    child = spawn(checkpoint, home, "--session", "nohup", preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        child.kill(signal.SIGHUP)
        send(child, "hello there")
        child.expect(r"\[cut off at max_new_tokens")
        wait_for_prompt(child)
        assert [t["user"] for t in journal_turns(home, "nohup")] == ["hello there"]
        assert finish(child) == 0
    finally:
        child.close(force=True)


def test_the_terminal_going_away_mid_answer_journals_it_as_interrupted(tmp_path_factory: pytest.TempPathFactory,
                                                                          home: Path) -> None:
    """An SSH connection that drops mid-answer: the terminal closes (SIGHUP, and every terminal call fails with
    EIO). termios raises its own `termios.error`, which the terminal-mode code did not catch: the turn was
    journaled as "error" without its token ids ("[cut off: the server failed mid-answer]" on resume), the chat
    printed "Error: error: (5, 'Input/output error')", and the process could abort ("terminate called without
    an active exception") with the model's worker still running."""
    endless = build_checkpoint(tmp_path_factory.mktemp("endless"), TinySpec(endless=True))
    child = spawn(endless, home, "--session", "dropped", max_new_tokens=1800)
    send(child, "tell me a long story")
    child.expect_exact("thinking")
    child.expect(r"\w{3}")  # answer text is streaming
    assert_mid_answer(child)
    assert _drop_the_terminal(child) == 128 + signal.SIGHUP
    (turn,) = journal_turns(home, "dropped")
    assert turn["finish_reason"] == "interrupted" and turn["answer_ids"], turn
    # At the prompt, too: prompt_toolkit's last redraw failed with EIO, and the chat ended in status 1.
    child = spawn(endless, home, "--resume", "dropped")
    assert _drop_the_terminal(child) in (128 + signal.SIGHUP, -signal.SIGHUP)  # either way the shell says 129
    assert len(journal_turns(home, "dropped")) == 1


def _drop_the_terminal(child: pexpect.spawn) -> int:
    """Close the terminal under the chat, as sshd does when the connection drops; the chat's exit status."""
    child.ptyproc.fileobj.close()  # through its file object: nothing closes the descriptor number again later
    _, status = os.waitpid(child.pid, 0)
    # Reaped here: neither pexpect nor ptyprocess may wait for it, or close anything, again.
    child.ptyproc.closed = child.ptyproc.terminated = True
    child.closed, child.terminated, child.child_fd = True, True, -1
    return os.waitstatus_to_exitcode(status)
