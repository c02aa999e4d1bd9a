"""Reliability and security 3 (issue 20), the local half: nothing deleted, nothing raw on the terminal, names
that work, `/file` that never blocks, no typed line or turn lost. One regression test per finding."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bluelm_cli.cli.app import app
from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint

runner = CliRunner()
HOSTILE = "evil\x1b]2;PWNED\x07\x1b[2J\u202eexe.txt\u2066x\u2069\x9b31m"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("reliability3"), TinySpec())


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# ------------------------------------------------------------------------------------------ export: data safe
def test_an_existing_out_partial_is_never_touched(checkpoint: Path, tmp_path: Path) -> None:
    """The export staged into a fixed OUT.partial and deleted whatever the user kept there."""
    mine = tmp_path / "out.partial"
    mine.mkdir()
    (mine / "thesis.tex").write_text("three years of work")
    result = runner.invoke(app, ["export", str(tmp_path / "out"), "-m", str(checkpoint)])
    assert result.exit_code == 0, result.stderr
    assert (mine / "thesis.tex").read_text() == "three years of work"
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.partial"]  # no temporary left behind


@pytest.mark.parametrize("export_format", ["hf", "gguf"])
def test_exporting_a_source_named_out_partial_keeps_the_source(export_format: str, tmp_path: Path) -> None:
    """`bluelm export --model SRC.partial SRC` wrote the export into the source and moved it away."""
    source = build_checkpoint(tmp_path / "m.partial", TinySpec())
    before = _digest(source)
    out = tmp_path / ("m" if export_format == "hf" else "m")
    result = runner.invoke(app, ["export", str(out), "-m", str(source), "--format", export_format])
    assert result.exit_code == 0, result.stderr
    assert _digest(source) == before
    assert out.exists()


def _export_stopped_by(signum: int, checkpoint: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `bluelm export` in a process that says when it has staged files and then waits for the signal."""
    out = tmp_path / "out"
    script = (
        "import sys\n"
        "import bluelm_cli.export.hf as hf\n"
        "side = hf._write_side_files\n"
        "def staged_then_wait(*args):\n"
        "    written = side(*args)\n"
        "    print('staged', flush=True)\n"
        "    sys.stdin.readline()\n"  # blocks until the test's signal arrives
        "    return written\n"
        "hf._write_side_files = staged_then_wait\n"
        "from bluelm_cli.cli.app import main\n"
        f"sys.argv = ['bluelm', 'export', {str(out)!r}, '-m', {str(checkpoint)!r}]\n"
        "main()\n"
    )
    env = {**os.environ, "BLUELM_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "staged\n"
        assert [p for p in tmp_path.iterdir() if p.name != "home"]  # the temporary exists now
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
@pytest.mark.slow
def test_a_signal_during_an_export_leaves_no_temporary(signum: int, checkpoint: Path, tmp_path: Path) -> None:
    """SIGTERM or SIGHUP during an export left a stale partial folder next to OUT."""
    result = _export_stopped_by(signum, checkpoint, tmp_path)
    if signum == signal.SIGINT:
        assert result.returncode == 130
    else:
        assert result.returncode == -signum, result.stderr  # ended by the signal, as a shell expects
    assert [p.name for p in tmp_path.iterdir() if p.name != "home"] == []


def test_export_errors_come_before_the_work(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bluelm_cli.export.hf as hf

    def no_work(*args, **kwargs):
        raise AssertionError("the export started")

    monkeypatch.setattr(hf, "export_hf", no_work)
    empty = tmp_path / "cwd"
    empty.mkdir()
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    monkeypatch.chdir(empty)
    cases = [
        (".", "Error: . is the current folder or holds it; give a new folder for OUT, e.g. ./BlueLM-7B-Chat-llama\n"),
        (str(empty), f"Error: {empty} is the current folder or holds it; give a new folder for OUT, e.g. ./BlueLM-7B-Chat-llama\n"),
        (str(tmp_path / "link"), f"Error: {tmp_path / 'link'} is a symbolic link; give a new path for OUT, not a link\n"),
        (str(tmp_path / "dangling"), f"Error: {tmp_path / 'dangling'} is a symbolic link; give a new path for OUT, not a link\n"),
    ]
    for out, message in cases:
        result = runner.invoke(app, ["export", out, "-m", str(checkpoint)])
        assert (result.exit_code, result.stdout, result.stderr) == (1, "", message)
    assert list(empty.iterdir()) == [] and list((tmp_path / "target").iterdir()) == []

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr("bluelm_cli.export.shutil.disk_usage", lambda path: Usage(10**9, 10**9 - 4096, 4096))
    result = runner.invoke(app, ["export", str(tmp_path / "new"), "-m", str(checkpoint)])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {tmp_path} has 4.0 KB free and the export of {checkpoint.name} needs about ")
    assert result.stderr.endswith("; free some space or choose another OUT\n") and result.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "dangling", "link", "target"]


def test_an_unwritable_parent_is_refused_before_the_work(checkpoint: Path) -> None:
    probe = Path("/sys/bluelm-probe")
    try:
        probe.mkdir()
    except OSError:
        pass
    else:
        probe.rmdir()
        pytest.skip("/sys is writable here")
    result = runner.invoke(app, ["export", "/sys/bluelm-export", "-m", str(checkpoint)])
    assert (result.exit_code, result.stderr) == (
        1, "Error: cannot write in /sys (Operation not permitted); choose an OUT in a folder you can write\n")


def test_exported_weights_follow_the_umask_like_every_other_file(checkpoint: Path, tmp_path: Path) -> None:
    """model.safetensors was 0600 while the other files were 0644: a server reading as another user failed."""
    old = os.umask(0o022)
    try:
        result = runner.invoke(app, ["export", str(tmp_path / "out"), "-m", str(checkpoint)])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.stderr
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "out").iterdir()}
    assert set(modes.values()) == {"0o644"}, modes
    assert oct((tmp_path / "out").stat().st_mode & 0o777) == "0o755"


# ------------------------------------------------------------------------------ nothing raw on the terminal
RAW = ("\x1b]", "\x1b[2J", "\u202e", "\u2066", "\u2069", "\x9b", "\x07")


def _clean(text: str) -> bool:
    return not any(raw in text for raw in RAW)


def test_the_sanitiser_shows_bidi_controls_and_escapes() -> None:
    from bluelm_cli.core.sanitize import safe_for_terminal

    assert safe_for_terminal("a\u202ab\u202bc\u202cd\u202de\u202ef\u2066g\u2067h\u2068i\u2069j") == (
        "a\ufffdb\ufffdc\ufffdd\ufffde\ufffdf\ufffdg\ufffdh\ufffdi\ufffdj")
    assert safe_for_terminal("tab\tnew\nline \u200d\u05d0 中文 😀") == "tab\tnew\nline \u200d\u05d0 中文 😀"
    assert _clean(safe_for_terminal(HOSTILE))


def _hostile_journal(sessions_dir: Path, stem: str = HOSTILE) -> Path:
    """A journal someone else wrote: a hostile start-record name and model id, under a hostile file name."""
    import json

    sessions_dir.mkdir(parents=True, exist_ok=True)
    path = sessions_dir / f"{stem}.jsonl"
    records = [
        {"type": "start", "version": 1, "name": HOSTILE, "model_id": HOSTILE, "system": None, "sampling": {},
         "created_at": "2026-12-06T00:00:00Z"},
        {"type": "turn", "user": "hi", "answer": "yo", "answer_ids": [], "finish_reason": "stop"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_session_names_file_names_and_model_ids_are_sanitised_in_sessions(isolated_home: Path) -> None:
    from bluelm_cli.config.paths import user_paths

    _hostile_journal(user_paths().sessions_dir)
    for args in (["sessions"], ["sessions", "search", "hi"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert _clean(result.stdout) and "evil" in result.stdout, repr(result.stdout)


def test_the_banner_sanitises_the_model_id_and_session_name(isolated_home: Path) -> None:
    import io

    from rich.console import Console

    from bluelm_cli.chat.service import Chat
    from bluelm_cli.config.paths import user_paths
    from bluelm_cli.core.backend import BackendInfo
    from bluelm_cli.session import Session
    from bluelm_cli.testing.fakes import FakeBackend
    from bluelm_cli.ui.output import ChatOutput
    from bluelm_cli.ui.repl import ChatRepl

    class HostileServer(FakeBackend):
        def info(self) -> BackendInfo:
            return BackendInfo(model_id=HOSTILE, device="cpu", dtype="float32", context_limit=2048)

    _hostile_journal(user_paths().sessions_dir, "shared")
    session = Session.resume(user_paths().sessions_dir, "shared")
    screen = io.StringIO()
    console = Console(file=screen, width=300, force_terminal=True, color_system=None)
    repl = ChatRepl(Chat(HostileServer(), session), ChatOutput(console, interactive=True), paths=user_paths())
    repl.show_banner()
    repl.show_resumed()
    assert _clean(screen.getvalue()) and "evil" in screen.getvalue(), repr(screen.getvalue())
    assert "Session shared ·" in screen.getvalue()  # the name it resumes by, not the start record's
    session.close()


def test_paths_in_export_and_load_messages_are_sanitised(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / HOSTILE
    result = runner.invoke(app, ["export", str(out), "-m", str(checkpoint)])
    assert result.exit_code == 0 and _clean(result.stdout) and "evil" in result.stdout, repr(result.stdout)
    missing = tmp_path / f"{HOSTILE}-missing"
    result = runner.invoke(app, ["ask", "--model", str(missing), "hi"])
    assert result.exit_code == 1 and _clean(result.stderr) and "evil" in result.stderr, repr(result.stderr)


def test_copy_puts_no_escape_or_bidi_override_on_the_clipboard(isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer holding ESC [201~ (the end of a bracketed paste) went to the clipboard raw: pasted into a
    shell, what followed it ran as if typed."""
    import base64
    import io
    import re

    from rich.console import Console

    from bluelm_cli.chat.service import Chat
    from bluelm_cli.config.paths import user_paths
    from bluelm_cli.session import Session
    from bluelm_cli.testing.fakes import FakeBackend
    from bluelm_cli.ui.output import ChatOutput
    from bluelm_cli.ui.repl import ChatRepl

    monkeypatch.delenv("TMUX", raising=False)
    answer = "run `ls`\x1b[201~rm -rf ~\n\u202eevil"
    session = Session.new(user_paths().sessions_dir, name="copy", model_id="fake/BlueLM")
    screen = io.StringIO()
    repl = ChatRepl(Chat(FakeBackend().queue(answer), session),
                    ChatOutput(Console(file=screen, width=200), interactive=True), paths=user_paths())
    repl.handle("hi")
    repl.handle("/copy")
    (payload,) = re.findall(r"\x1b\]52;c;([A-Za-z0-9+/=]*)\x07", screen.getvalue())
    copied = base64.b64decode(payload).decode()
    assert copied == "run `ls`\ufffd[201~rm -rf ~\n\ufffdevil"
    session.close()


# ----------------------------------------------------------------------------------- /file never blocks
def _read_in_thread(path: str):
    """read_attachment(path) in a thread, so that a hang fails the test instead of hanging it."""
    import threading

    from bluelm_cli.chat.attachments import read_attachment

    outcome: list[object] = []

    def read() -> None:
        try:
            outcome.append(read_attachment(path))
        except Exception as error:  # noqa: BLE001 - the outcome is asserted
            outcome.append(error)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), f"reading {path} blocked"
    return outcome[0]


def test_file_refuses_a_fifo_nothing_writes_to_and_special_files(tmp_path: Path) -> None:
    import socket

    from bluelm_cli.core.errors import BlueLMError

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    error = _read_in_thread(str(fifo))
    if not isinstance(error, BlueLMError):  # unblock the reader of the old code so that the thread ends
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert isinstance(error, BlueLMError)
    assert str(error) == f"{fifo} is a named pipe (FIFO) that nothing writes to; give a regular file"
    error = _read_in_thread("/dev/null")
    assert str(error) == "/dev/null is a device, not a text file; give a regular file"
    sock_path = tmp_path / "sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    try:
        assert str(_read_in_thread(str(sock_path))) == f"{sock_path} is a socket, not a text file; give a regular file"
    finally:
        server.close()


def test_file_reads_a_fifo_that_a_writer_feeds(tmp_path: Path) -> None:
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    opened = threading.Event()

    def writer() -> None:
        with open(fifo, "w") as pipe:  # blocks until the reader has opened it
            opened.set()
            pipe.write("from a pipe\n")

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    # The reader opens without waiting: give the writer's open() a reader first, then read.
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    assert opened.wait(30)
    try:
        attachment = _read_in_thread(str(fifo))
    finally:
        os.close(fd)
    thread.join(30)
    assert attachment.text == f"{fifo}:\n```\nfrom a pipe\n```"


# ------------------------------------------------------------------------------------------ session names
def _turns(sessions_dir: Path, stem: str) -> list[str]:
    import json

    records = [json.loads(line) for line in (sessions_dir / f"{stem}.jsonl").read_text("utf-8").splitlines()]
    return [r["user"] for r in records if r["type"] == "turn"]


def test_a_cjk_session_name_too_long_for_a_file_name_is_a_clear_error(checkpoint: Path, isolated_home: Path) -> None:
    """90 CJK characters (270 bytes) passed the 100-character check and failed as "OSError: File name too long"."""
    from bluelm_cli.config.paths import user_paths

    too_long = "中" * 90
    result = runner.invoke(app, ["ask", "--model", str(checkpoint), "-n", "2", "--session", too_long, "hi"])
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr.splitlines()[-1] == (
        f"Error: session name '{'中' * 20}…' is 270 bytes in UTF-8; a session name can be at most 249 bytes"
        " (about 83 Chinese characters), as it names a file; choose a shorter name")
    longest = "中" * 83
    result = runner.invoke(app, ["ask", "--model", str(checkpoint), "-n", "2", "--session", longest, "hi"])
    assert result.exit_code == 0, result.stderr
    assert _turns(user_paths().sessions_dir, longest) == ["hi"]
    for command in (["chat", "--session", too_long], ["chat", "--resume", too_long]):
        result = runner.invoke(app, [*command, "--model", str(checkpoint)], input="")
        assert result.exit_code == 2 and "at most 249 bytes" in result.stderr and "Traceback" not in result.output


def test_a_chat_that_ends_with_nothing_said_leaves_no_empty_session(checkpoint: Path, isolated_home: Path) -> None:
    """Every chat opened and left without a message stayed as "0 turns (empty)" in `bluelm sessions`, and
    `chat -c` / `ask -c` then continued that empty session instead of the last conversation."""
    from bluelm_cli.config.paths import user_paths

    sessions_dir = user_paths().sessions_dir
    result = runner.invoke(app, ["ask", "--model", str(checkpoint), "-n", "2", "--session", "real", "hi"])
    assert result.exit_code == 0, result.stderr
    for command, typed in ((["chat"], ""), (["chat"], "/set temperature 0.2\n/show system\n"),
                           (["chat", "--session", "named"], "")):
        result = runner.invoke(app, [*command, "--model", str(checkpoint), "-n", "2"], input=typed)
        assert result.exit_code == 0, result.stderr
        assert sorted(path.name for path in sessions_dir.glob("*.jsonl")) == ["real.jsonl"]
    result = runner.invoke(app, ["chat", "-c", "--model", str(checkpoint), "-n", "2"], input="more\n")
    assert result.exit_code == 0, result.stderr
    assert _turns(sessions_dir, "real") == ["hi", "more"]
    # A chat that said something keeps its session, and so does a resumed one that said nothing this time.
    result = runner.invoke(app, ["chat", "--resume", "real", "--model", str(checkpoint), "-n", "2"], input="")
    assert result.exit_code == 0 and _turns(sessions_dir, "real") == ["hi", "more"]
    # A session the user named keeps what was set in it with nothing said: a system prompt to come back to.
    result = runner.invoke(app, ["chat", "--session", "pirate", "--model", str(checkpoint), "-n", "2"],
                           input="/set system You are a pirate.\n")
    assert result.exit_code == 0, result.stderr
    assert sorted(path.name for path in sessions_dir.glob("*.jsonl")) == ["pirate.jsonl", "real.jsonl"]
    result = runner.invoke(app, ["chat", "--resume", "pirate", "--model", str(checkpoint), "-n", "2"], input="/show system\n")
    assert result.exit_code == 0 and "You are a pirate." in result.stdout


def test_a_session_name_starting_with_a_dash_works_with_an_equals_sign(checkpoint: Path, isolated_home: Path) -> None:
    from bluelm_cli.config.paths import user_paths

    for question in ("one", "two"):
        result = runner.invoke(app, ["ask", "--model", str(checkpoint), "-n", "2", "--session=-x", question])
        assert result.exit_code == 0, result.stderr
    result = runner.invoke(app, ["chat", "--model", str(checkpoint), "-n", "2", "--resume=-x"], input="three\n")
    assert result.exit_code == 0, result.stderr
    assert _turns(user_paths().sessions_dir, "-x") == ["one", "two", "three"]
    result = runner.invoke(app, ["sessions", "show", "--", "-x"])
    assert result.exit_code == 0 and "three" in result.stdout


def test_nfc_and_nfd_spellings_are_one_session(checkpoint: Path, isolated_home: Path) -> None:
    """`--session café` typed on macOS (NFD) and on Linux (NFC) made two sessions with names that look alike."""
    import unicodedata

    from bluelm_cli.config.paths import user_paths

    nfc, nfd = unicodedata.normalize("NFC", "café-한국"), unicodedata.normalize("NFD", "café-한국")
    assert nfc != nfd
    for name, question in ((nfd, "one"), (nfc, "two"), (nfd, "three")):
        result = runner.invoke(app, ["ask", "--model", str(checkpoint), "-n", "2", "--session", name, question])
        assert result.exit_code == 0, result.stderr
    assert [p.name for p in user_paths().sessions_dir.iterdir()] == [f"{nfc}.jsonl"]
    assert _turns(user_paths().sessions_dir, nfc) == ["one", "two", "three"]
    result = runner.invoke(app, ["sessions", "show", nfd])
    assert result.exit_code == 0 and "three" in result.stdout


@pytest.mark.slow
def test_two_asks_starting_the_same_new_session_at_once(checkpoint: Path, tmp_path: Path) -> None:
    """Two `bluelm ask --session NEW` at the same moment: the second failed with "already exists …; resume it"
    (it had been told to continue or start NEW). Now one session holds both turns, or one is refused clearly.
    Both processes are held after they have looked for NEW and before they create it, then let go together."""
    home = tmp_path / "home"
    script = (
        "import os, sys\n"
        "import bluelm_cli.cli.app as app\n"
        "import bluelm_cli.cli.ask as ask\n"
        "opened = ask.open_backend\n"
        "hold = int(sys.argv[3])\n"
        "def held(*args, **kwargs):\n"
        "    print('looked', flush=True)\n"
        "    os.read(hold, 1)\n"  # until the test lets both go
        "    return opened(*args, **kwargs)\n"
        "ask.open_backend = held\n"
        "sys.argv = ['bluelm', 'ask', '--model', sys.argv[1], '-n', '2', '--session', 'NEW', sys.argv[2]]\n"
        "app.main()\n"
    )
    env = {**os.environ, "BLUELM_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    holds = [os.pipe() for _ in range(2)]
    processes = [
        subprocess.Popen([sys.executable, "-c", script, str(checkpoint), question, str(read_end)], env=env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         pass_fds=(read_end,))
        for question, (read_end, _) in zip(("one", "two"), holds)
    ]
    try:
        for process in processes:
            assert process.stdout.readline() == "looked\n"
        for read_end, write_end in holds:  # both have found no NEW: now both create it
            os.write(write_end, b"go")
        outcomes = [(process.wait(timeout=300), process.stderr.read()) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for read_end, write_end in holds:
            os.close(read_end)
            os.close(write_end)
    sessions = home / "sessions"
    assert [p.name for p in sessions.iterdir()] == ["NEW.jsonl"]
    turns = _turns(sessions, "NEW")
    refused = [err for status, err in outcomes if status != 0]
    if len(turns) == 2:
        assert not refused and sorted(turns) == ["one", "two"]
    else:
        assert len(turns) == 1 and len(refused) == 1, outcomes
        holder = next(process.pid for process, (status, _) in zip(processes, outcomes) if status == 0)
        assert refused[0].splitlines()[-1] == (  # the note is written before the new journal has its name
            f"Error: session 'NEW' is in use by a bluelm ask still answering in it (process {holder}); try again"
            " when that answer is done")


# ------------------------------------------------------------------------- a paste without bracketed paste
def _paste_work(lines: int, paths) -> tuple[int, int, int]:
    """(insertions, undo entries saved, characters the insertions copied) for a paste of `lines` lines arriving
    as keystrokes, through the real prompt_toolkit REPL; the paste must arrive as one message."""
    from prompt_toolkit.buffer import Buffer

    from test_repl import chat as run_repl
    from bluelm_cli.testing.fakes import FakeBackend
    from test_chat import new_session

    counts = {"insert": 0, "undo": 0, "copied": 0}
    insert_text, save_to_undo_stack = Buffer.insert_text, Buffer.save_to_undo_stack

    def counted_insert(self, data, *args, **kwargs):
        counts["insert"] += 1
        counts["copied"] += len(self.text) + len(data)
        return insert_text(self, data, *args, **kwargs)

    def counted_save(self, *args, **kwargs):
        counts["undo"] += 1
        return save_to_undo_stack(self, *args, **kwargs)

    paste = [f"line {number:05d} of the paste" for number in range(lines)]
    backend = FakeBackend(context_limit=1_000_000).queue("Pasted.")
    Buffer.insert_text, Buffer.save_to_undo_stack = counted_insert, counted_save  # type: ignore[method-assign]
    try:
        result = run_repl(backend, new_session(paths, name=f"p{lines}"), paths, ["\r".join(paste) + "\r", "/exit\r"])
    finally:
        Buffer.insert_text, Buffer.save_to_undo_stack = insert_text, save_to_undo_stack  # type: ignore[method-assign]
    assert result.users == ["\n".join(paste)]
    return counts["insert"], counts["undo"], counts["copied"]


def test_a_paste_without_bracketed_paste_takes_linear_work(isolated_home: Path) -> None:
    """10,000 pasted lines grew the process to 22.6 GB: every key was one insertion copying the whole buffer
    and one undo entry holding that copy."""
    from bluelm_cli.config.paths import user_paths

    small = _paste_work(1000, user_paths())
    large = _paste_work(4000, user_paths())
    print("paste work (insertions, undo entries, characters copied):", small, large)
    characters = 4000 * len("line 00000 of the paste\n")
    assert large[0] <= 4 * small[0] + 4 and large[0] < characters / 100  # a few insertions per read, not one a key
    assert large[1] <= 4 * small[1] + 4 and large[1] < characters / 100  # undo entries: bounded the same way


# ---------------------------------------------------------------------------------- a failed load, --no-history
def test_a_message_sent_while_the_model_loads_is_given_back_when_the_load_fails(isolated_home: Path) -> None:
    """With --no-history, a message typed while the model loaded was lost when the load failed: no ↑ brought
    it back. It is printed back before the error ends the chat."""
    import io

    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput
    from rich.console import Console

    from bluelm_cli.chat.background import LoadFailed
    from bluelm_cli.chat.service import Chat
    from bluelm_cli.config.paths import user_paths
    from bluelm_cli.core.errors import BlueLMError
    from bluelm_cli.session import Session
    from bluelm_cli.testing.fakes import FakeBackend
    from bluelm_cli.ui.repl import run_chat
    from test_background import GatedLoad, ReleasedWhenWaitedOn

    message = "my long question, typed once"
    backend = ReleasedWhenWaitedOn(GatedLoad(FakeBackend(), error=BlueLMError("model.safetensors is damaged")))
    session = Session.new(user_paths().sessions_dir, name="nh", model_id="fake/BlueLM")
    screen = io.StringIO()
    with create_pipe_input() as pipe:
        pipe.send_text(message + "\r")
        with pytest.raises(LoadFailed, match="model.safetensors is damaged"):
            run_chat(Chat(backend, session), console=Console(file=screen, width=200), paths=user_paths(),
                     pt_input=pipe, pt_output=DummyOutput(), keep_history=False)
    assert backend.waits >= 1  # it was sent, and waited for the model
    assert screen.getvalue().endswith(f"Not sent, as the model did not load; what you typed:\n{message}\n")
    session.close()


@pytest.mark.parametrize("first_message", [None, "first"], ids=["typed", "bluelm-chat-MESSAGE"])
def test_lines_typed_ahead_are_given_back_when_the_load_fails(isolated_home: Path, first_message: str | None) -> None:
    """Lines typed ahead behind a message that waited for the model were lost when the load failed: the
    ones prompt_toolkit had read were dropped, and the ones still on the terminal went to the shell once
    the chat ended (`echo SECOND-RAN-IN-SHELL`, typed as a message, ran in bash). They are printed back
    with the message, in order, and nothing is left on the terminal."""
    import io
    import select

    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput
    from rich.console import Console

    from bluelm_cli.chat.background import LoadFailed
    from bluelm_cli.chat.service import Chat
    from bluelm_cli.config.paths import user_paths
    from bluelm_cli.core.errors import BlueLMError
    from bluelm_cli.session import Session
    from bluelm_cli.testing.fakes import FakeBackend
    from bluelm_cli.ui.repl import run_chat
    from test_background import GatedLoad, ReleasedWhenWaitedOn

    class TypedAtWhileWaitedOn(ReleasedWhenWaitedOn):
        """The user types more lines while the chat waits for the model (they reach the terminal unread)."""

        typed = "echo typed during the wait\n/file notes.txt\n"

        def take_events(self, *, block: bool = False) -> list:
            if block and not self.waits:
                pipe.send_text(self.typed)
            return super().take_events(block=block)

    session = Session.new(user_paths().sessions_dir, name="ta", model_id="fake/BlueLM")
    screen = io.StringIO()
    with create_pipe_input() as pipe:
        backend = TypedAtWhileWaitedOn(GatedLoad(FakeBackend(), error=BlueLMError("model.safetensors is damaged")))
        # Typed: both in the prompt's first read, "second" waits as typeahead. `bluelm chat first`: no prompt
        # reads "second" before the wait.
        pipe.send_text("second\n" if first_message else "first\nsecond\n")
        with pytest.raises(LoadFailed, match="model.safetensors is damaged"):
            run_chat(Chat(backend, session), console=Console(file=screen, width=200), paths=user_paths(),
                     pt_input=pipe, pt_output=DummyOutput(), keep_history=False, first_message=first_message)
        left_for_the_shell = select.select([pipe.pipe.read_fd], [], [], 0)[0]
    assert backend.waits >= 1
    assert screen.getvalue().endswith(
        "Not sent, as the model did not load; what you typed:\nfirst\nsecond\necho typed during the wait\n/file notes.txt\n"
    ), screen.getvalue()
    assert not left_for_the_shell
    session.close()


# ------------------------------------------------------------------------------ no turn lost to an engine error
@pytest.fixture
def engine_fails_once(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The local engine fails before its first token (a CUDA error), once; later answers work."""
    from bluelm_cli.local.engine import ChatEngine

    generate, failures = ChatEngine._generate_locked, []

    def failing_once(self, *args, **kwargs):
        if not failures:
            failures.append(1)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(ChatEngine, "_generate_locked", failing_once)
    return failures


def _answered(sessions_dir: Path, stem: str) -> list[tuple[str, str]]:
    """The session's turns as (message, finish reason), as a resumed chat sees them."""
    from bluelm_cli.chat.journal import replay

    conversation, _ = replay(sessions_dir / f"{stem}.jsonl", repair=False)
    return [(turn.user, str(turn.finish_reason)) for turn in conversation.turns]


def test_an_engine_error_before_the_first_token_keeps_the_message_for_ask(
    checkpoint: Path, isolated_home: Path, engine_fails_once: list[int]
) -> None:
    from bluelm_cli.config.paths import user_paths

    result = runner.invoke(app, ["ask", "--model", str(checkpoint), "-n", "2", "--session", "lost", "keep me"])
    assert result.exit_code == 1 and engine_fails_once
    assert result.stderr.splitlines()[-1].startswith("Error: ") and "CUDA error" in result.stderr
    assert _answered(user_paths().sessions_dir, "lost") == [("keep me", "error")]  # kept, marked failed
    result = runner.invoke(app, ["chat", "--model", str(checkpoint), "-n", "2", "--resume", "lost"], input="/retry\n")
    assert result.exit_code == 0, result.stderr
    assert _answered(user_paths().sessions_dir, "lost") == [("keep me", "length")]  # /retry answered it, once


def test_an_engine_error_before_the_first_token_keeps_the_message_for_the_chat(
    checkpoint: Path, isolated_home: Path, engine_fails_once: list[int]
) -> None:
    from bluelm_cli.config.paths import user_paths

    result = runner.invoke(app, ["chat", "--model", str(checkpoint), "-n", "2", "--session", "lost2"],
                           input="keep me too\n/retry\n")
    assert engine_fails_once and "CUDA error" in result.stderr
    assert _answered(user_paths().sessions_dir, "lost2") == [("keep me too", "length")]


def test_a_local_engine_error_is_not_called_a_server_failure(
    checkpoint: Path, isolated_home: Path, engine_fails_once: list[int]
) -> None:
    """A local model's failure was noted "[cut off: the server failed mid-answer]": there is no server."""
    result = runner.invoke(app, ["chat", "--model", str(checkpoint), "-n", "2", "--session", "local-fail"],
                           input="keep me\n/save " + str(isolated_home / "t.md") + "\n")
    assert engine_fails_once and "CUDA error" in result.stderr
    assert "[cut off by an error; /retry asks again]" in result.stderr and "server" not in result.output
    assert "keep me\n\n**BlueLM:**\n\n*(cut off by an error)*" in (isolated_home / "t.md").read_text("utf-8")


def test_ask_with_the_same_file_twice_sends_it_once(checkpoint: Path, isolated_home: Path, tmp_path: Path) -> None:
    """`bluelm ask -f x.py -f ./x.py` put the file into the prompt twice (as /file did)."""
    import json

    source = tmp_path / "x.py"
    source.write_text("print(1)\n", encoding="utf-8")
    once = runner.invoke(app, ["ask", "--model", str(checkpoint), "-n", "1", "--json", "-f", str(source), "q"])
    twice = runner.invoke(app, ["ask", "--model", str(checkpoint), "-n", "1", "--json", "-f", str(source),
                                "-f", f"{tmp_path}/./x.py", "q"])
    assert (once.exit_code, twice.exit_code) == (0, 0), twice.stderr
    assert twice.stderr.count("Attached ") == 1
    assert json.loads(twice.stdout)["prompt_tokens"] == json.loads(once.stdout)["prompt_tokens"]


# ------------------------------------------------------------------------ lines typed while the model loads
def test_lines_typed_ahead_are_sent_one_by_one_in_order(isolated_home: Path, tmp_path: Path) -> None:
    """Lines typed while no prompt was up (the model loading, an answer streaming) reach the next prompt at
    once, each ending in a line feed (the terminal's line mode): they were joined into one message, and a
    `/file` among them took the following lines as part of its path. (Its hang in the harness, skipped until
    now, was the harness counting one handled line for the burst's four: "/exit" Enter and the last Ctrl-D
    then came in one read, where the Enter was taken for a pasted newline and the Ctrl-D did nothing;
    see test_repl.py's test_enter_with_ctrl_d_right_behind_it_sends_the_line.)"""
    from test_repl import chat as run_repl
    from bluelm_cli.config.paths import user_paths
    from bluelm_cli.testing.fakes import FakeBackend
    from test_chat import new_session

    notes = tmp_path / "notes.txt"
    notes.write_text("the notes\n")
    backend = FakeBackend().queue("One.", "Two.", "Three.")
    typed_ahead = f"first\nsecond\n/file {notes}\nthird\n"
    result = run_repl(backend, new_session(user_paths()), user_paths(), [typed_ahead, "/exit\r"])
    assert result.users == ["first", "second", f"{notes}:\n```txt\nthe notes\n```\n\nthird"]


def test_errors_in_script_mode_are_sanitised_even_into_a_pipe(isolated_home: Path, tmp_path: Path) -> None:
    """`bluelm chat < script 2> log`: an error naming a hostile path went raw into the log, which `cat log`
    then played on the terminal."""
    from bluelm_cli.chat.service import Chat
    from bluelm_cli.config.paths import user_paths
    from bluelm_cli.testing.fakes import FakeBackend
    from test_chat import new_session, run_script

    chat = Chat(FakeBackend().queue("Yes."), new_session(user_paths()))
    status, out, err = run_script(chat, user_paths(), f"/file {tmp_path / HOSTILE}\nhi\n")
    assert "no such file" in err and "evil" in err and _clean(err), repr(err)
    assert out == "Yes.\n" and [turn.user for turn in chat.session.turns] == ["hi"]


# ---------------------------------------------------------------------------------------- the stream
STREAM_CORPUS = [
    "你好，世界！  两个空格  and   three",
    "emoji 😀👍🏽🎉 then 龘𪚥 rare",
    "def f(x):\n    return  x  *  2\n\n\tif x:\n        pass\n",
    "    leading four",
    "trailing    ",
    " ▁ a literal lower one eighth block ▁▁ ",
    "a \n b \n\n  c",
]


@pytest.mark.parametrize("text", STREAM_CORPUS)
def test_streamed_text_equals_the_full_decode_where_a_window_starts_at_a_bare_space_piece(
    checkpoint: Path, text: str
) -> None:
    """Issue 20 reports a space dropped when the window starts with a bare `▁` piece. Not reproduced with the
    tiny BlueLM-style tokenizer (every prefix below starts a window at each position); kept as the guard."""
    from bluelm_cli.local.loading import load_tokenizer
    from bluelm_cli.modeling.tokenizer import StreamDetokenizer

    tokenizer = load_tokenizer(checkpoint)
    space = tokenizer.sp_model.piece_to_id("▁")
    ids = tokenizer.encode_plain(text)
    variants = [ids, [space, *ids], [space, space, *ids]] + [ids[:k] + [space] + ids[k:] for k in range(len(ids))]
    for variant in variants:
        stream = StreamDetokenizer(tokenizer)
        streamed = "".join(stream.add(i) for i in variant) + stream.flush()
        assert streamed.encode() == tokenizer.decode(variant, skip_special_tokens=True).encode(), variant
