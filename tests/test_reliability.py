"""The fault and bad-input campaign (issue 10), one regression test per finding.

Most run on the scripted fake backend (exact transcripts); what needs a model uses a tiny checkpoint
through the CLI runner, and what needs a real terminal or a second process uses pexpect or a subprocess.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from bluelm_cli.chat import journal as journal_module
from bluelm_cli.chat.service import Chat
from bluelm_cli.cli.app import app
from bluelm_cli.chat.conversation import Turn
from bluelm_cli.core.errors import BlueLMError, UsageError
from bluelm_cli.ui.output import ChatOutput
from bluelm_cli.config.paths import UserPaths, user_paths
from bluelm_cli.ui.repl import ChatRepl, run_chat
from bluelm_cli.session import Session, list_sessions
from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint
from bluelm_cli.testing.fakes import FakeBackend

ESCAPES = "before \x1b]2;PWNED\x07 after \x1b[2J\x1b[41mRED \x1b]52;c;aGk=\x07 \x00"
runner = CliRunner()


@pytest.fixture
def paths() -> UserPaths:
    return user_paths()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("reliability"), TinySpec())


def new_session(paths: UserPaths, name: str = "r") -> Session:
    return Session.new(paths.sessions_dir, name=name, model_id="fake/BlueLM")


def terminal() -> Console:
    return Console(file=io.StringIO(), width=120, force_terminal=True, color_system="standard")


def repl_for(chat: Chat, console: Console | None = None) -> ChatRepl:
    console = console or Console(file=io.StringIO(), width=200)
    return ChatRepl(chat, ChatOutput(console, interactive=True), paths=user_paths())


def _has_control(text: str) -> bool:
    # rich's own styling (ESC [ … m) aside, nothing may reach the terminal as a control character.
    import re

    stripped = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return any(ord(ch) < 32 and ch not in "\n\t" or 0x7F <= ord(ch) <= 0x9F for ch in stripped)


# ------------------------------------------------------------------------------------------ 1. escapes
def test_user_text_from_a_session_file_never_drives_the_terminal(paths: UserPaths, tmp_path: Path) -> None:
    session = new_session(paths)
    session.add_turn(Turn(user=ESCAPES, answer="fine " + ESCAPES, answer_ids=[]))
    session.set_setting("system", "sys " + ESCAPES)
    console = terminal()
    out = ChatOutput(console, interactive=True)
    out.show_turns(session.turns)  # --resume and /load replay
    out.note(f"Removed the last exchange ({ESCAPES})")  # the /undo preview
    out.error(ESCAPES)
    screen = console.file.getvalue()
    assert "PWNED" in screen and not _has_control(screen)
    markdown = session.save(tmp_path / "t.md").read_text("utf-8")
    assert "PWNED" in markdown and not _has_control(markdown)
    saved = json.loads(session.save(tmp_path / "t.json").read_text("utf-8"))
    assert saved["turns"][0]["user"] == ESCAPES  # the data itself is kept as it was


# ------------------------------------------------------------------------------ 2. one session, one chat
_HOLD = """
import sys
import threading
from bluelm_cli.session import Session
session = Session.new(sys.argv[1], name="dup", model_id="m")
print("ready", flush=True)
sys.stdin.readline()
"""


def test_a_second_process_cannot_open_a_session_in_use(paths: UserPaths) -> None:
    paths.sessions_dir.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(paths.sessions_dir)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        with pytest.raises(BlueLMError, match=r"^session 'dup' is in use by another bluelm \(a chat, or an ask still answering\)"):
            Session.resume(paths.sessions_dir, "dup")
    finally:
        holder.communicate("\n", timeout=60)
    # The holder is gone, and with it the lock: a crashed chat leaves nothing stale.
    assert Session.resume(paths.sessions_dir, "dup").name == "dup"


# ----------------------------------------------------------------------------------------- 3-4. /save
def test_save_refuses_the_live_journal_and_other_journals(paths: UserPaths) -> None:
    chat = Chat(FakeBackend().queue("hi"), new_session(paths))
    other = new_session(paths, "other")
    repl = repl_for(chat)
    repl.handle("hello")
    before = chat.session.journal.read_bytes()  # type: ignore[union-attr]
    repl.handle(f"/save {chat.session.journal}")
    repl.handle(f"/save {other.journal}")
    text = repl.out.console.file.getvalue()  # type: ignore[attr-defined]
    assert text.count("is a session journal, which bluelm keeps itself; save the copy under another name") == 2
    assert chat.session.journal.read_bytes() == before  # type: ignore[union-attr]
    assert Session.resume(paths.sessions_dir, "r").turns[0].answer == "hi"


@pytest.mark.skipif(os.name != "posix", reason="FIFOs and symbolic links")
def test_save_writes_through_links_and_refuses_what_is_not_a_file(paths: UserPaths, tmp_path: Path) -> None:
    session = new_session(paths)
    real = tmp_path / "real.json"
    real.write_text("")  # an empty file: /save replaces only those and its own earlier saves
    real.chmod(0o640)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    session.save(link)
    assert link.is_symlink() and json.loads(real.read_text())["format"] == "bluelm-cli.session"
    assert real.stat().st_mode & 0o777 == 0o640
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    with pytest.raises(BlueLMError, match=r"cannot save to .*pipe.json: it is a FIFO, not a regular file"):
        session.save(fifo)
    assert fifo.exists() and not fifo.is_file()
    with pytest.raises(BlueLMError, match="it is a directory"):
        session.save(tmp_path)


# --------------------------------------------------------------------------------- 5. damaged journals
def test_a_damaged_first_line_loses_only_that_line(paths: UserPaths) -> None:
    session = new_session(paths, "hurt")
    session.add_turn(Turn(user="one", answer="1", answer_ids=[]))
    session.add_turn(Turn(user="two", answer="2", answer_ids=[]))
    session.close()
    path = session.journal
    assert path is not None
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\x00garbage" + lines[0][8:] + b"\n" + b"\n".join(lines[1:]))
    (info,) = list_sessions(paths.sessions_dir)
    assert info.damaged and info.unreadable is None and info.turns == 2
    resumed = Session.resume(paths.sessions_dir, "hurt")
    assert [t.user for t in resumed.turns] == ["one", "two"]
    assert len(resumed.warnings) == 2 and "first record was damaged" in resumed.warnings[1]


def test_sessions_lists_damaged_and_unreadable_journals(paths: UserPaths) -> None:
    new_session(paths, "fine").close()
    paths.sessions_dir.joinpath("junk.jsonl").write_text("not json\n")
    result = runner.invoke(app, ["sessions"])
    assert result.exit_code == 0
    assert "junk" in result.stdout and "unreadable" in result.stdout and "fine" in result.stdout


# ------------------------------------------------------------------------------------- 6. a full disk
def test_a_full_disk_keeps_turns_in_memory_retries_and_holds_exit(paths: UserPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    real_append = journal_module.append_record
    full = {"on": False}

    def append(path: Path, record: dict) -> None:
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(path, record)

    monkeypatch.setattr("bluelm_cli.session.append_record", append)
    chat = Chat(FakeBackend().queue("a1", "a2", "a3"), new_session(paths, "disk"))
    repl = repl_for(chat)
    repl.handle("q1")
    full["on"] = True
    repl.handle("q2")
    repl.handle("q3")
    screen = repl.out.console.file.getvalue()  # type: ignore[attr-defined]
    assert screen.count("could not write the session journal") == 1  # said once, not every turn
    assert [t.user for t in chat.session.turns] == ["q1", "q2", "q3"] and chat.session.unwritten == 2
    assert repl.may_exit() is False  # the first /exit is held: the user is told how to keep them
    assert "2 changes are not in the session journal" in repl.out.console.file.getvalue()  # type: ignore[attr-defined]
    full["on"] = False  # space again: the next change writes everything, in order
    repl.handle("/set temperature 0.5")
    assert chat.session.unwritten == 0
    records = [json.loads(line) for line in chat.session.journal.read_text().splitlines()]  # type: ignore[union-attr]
    resumed_users = [r.get("user") for r in records if r["type"] == "turn"]  # (q1's message record came first)
    assert [u for u in resumed_users if u] == ["q1", "q2", "q3"]


def test_exit_with_unwritten_changes_needs_a_second_exit(paths: UserPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: Path, record: dict) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    chat = Chat(FakeBackend().queue("a1"), new_session(paths, "x"))
    monkeypatch.setattr("bluelm_cli.session.append_record", broken)
    repl = repl_for(chat)
    repl.handle("q1")
    assert repl.may_exit() is False and repl.may_exit() is True
    out, err = io.StringIO(), io.StringIO()
    chat2 = Chat(FakeBackend().queue("b1"), new_session_unjournaled_failing(paths, monkeypatch))
    status = run_chat(chat2, console=Console(file=out), paths=paths, stdin=io.StringIO("q\n"),
                      err_console=Console(file=err, width=300))
    assert status == 1 and "end the script with a /save PATH line to keep them" in err.getvalue()


def new_session_unjournaled_failing(paths: UserPaths, monkeypatch: pytest.MonkeyPatch) -> Session:
    monkeypatch.undo()
    session = new_session(paths, "y")

    def broken(path: Path, record: dict) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("bluelm_cli.session.append_record", broken)
    return session


# -------------------------------------------------------------------------------- 7-9. input, settings
def test_set_system_none_clears_it(paths: UserPaths) -> None:
    chat = Chat(FakeBackend(), new_session(paths))
    repl = repl_for(chat)
    for clear in ("none", '""', "unset", "NONE"):
        repl.handle("/set system Be brief.")
        assert chat.session.system == "Be brief."
        repl.handle(f"/set system {clear}")
        assert chat.session.system is None
    assert "system = (unset)" in repl.out.console.file.getvalue()  # type: ignore[attr-defined]


def test_load_refuses_ids_the_model_does_not_have(paths: UserPaths, tmp_path: Path) -> None:
    backend = FakeBackend(context_limit=256)
    backend.encoder.vocab_size = 1000  # type: ignore[misc]
    chat = Chat(backend, new_session(paths))
    for bad in (999999, -5):
        saved = tmp_path / f"bad{bad}.json"
        saved.write_text(json.dumps({"format": "bluelm-cli.session", "version": 1, "model_id": "m",
                                     "turns": [{"user": "u", "answer": "a", "answer_ids": [5, bad]}]}))
        repl = repl_for(chat)
        repl.handle(f"/load {saved}")
        assert f"Error: cannot load {saved}: turn 1 holds token id {bad}, which this model does not have" in (
            repl.out.console.file.getvalue()  # type: ignore[attr-defined]
        )
        assert chat.session.turns == []


def test_a_resumed_turn_with_foreign_ids_is_sent_as_text(paths: UserPaths) -> None:
    session = new_session(paths)
    session.add_turn(Turn(user="u", answer="ab", answer_ids=[5, 999999]))
    backend = FakeBackend().queue("ok")
    backend.encoder.vocab_size = 1000  # type: ignore[misc]
    chat = Chat(backend, session)
    assert "turn 1 holds token id 999999" in session.warnings[-1]
    stream = chat.send("next")
    list(stream)
    assert backend.prompt_text() == "<s>[|Human|]:u[|AI|]:ab</s>[|Human|]:next[|AI|]:"


def test_max_new_tokens_must_fit_the_context(paths: UserPaths) -> None:
    chat = Chat(FakeBackend(context_limit=2048), new_session(paths))
    with pytest.raises(UsageError, match=r"max_new_tokens must be less than the model's context window \(2,048 tokens\), got 99999"):
        chat.set_setting("max_new_tokens", "99999")
    assert chat.sampling.max_new_tokens == 512


def test_settings_that_cannot_fit_are_usage_errors_before_the_weights(checkpoint: Path) -> None:
    result = runner.invoke(app, ["ask", "--model", str(checkpoint), "--device", "cpu", "-n", "5000", "hi"])
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == (
        "Error: max_new_tokens must be less than the model's context window (2,048 tokens), got 5000"
    )
    assert "Loaded" not in result.stderr
    result = runner.invoke(app, ["ask", "--model", str(checkpoint), "--seed", "99999999999999999999999", "hi"])
    assert result.exit_code == 2 and result.stderr.startswith("Error: seed must be a whole number from 0 to 2^63-1")


# ------------------------------------------------------------------------------- 10-11. bad checkpoints
def test_a_bad_generation_config_value_is_ignored_with_a_warning(checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "gen"
    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "max_new_tokens": -5, "top_k": 3}))
    result = runner.invoke(app, ["ask", "--model", str(folder), "--device", "cpu", "-t", "0", "hi"])
    assert result.exit_code == 0, result.stderr
    assert "Warning: ignoring max_new_tokens in" in result.stderr
    shown = runner.invoke(app, ["config", "--model", str(folder)])
    row = next(line for line in shown.stdout.splitlines() if line.startswith("top_k"))
    assert row.split() == ["top_k", "3", "checkpoint", "generation_config.json"]
    assert next(line for line in shown.stdout.splitlines() if line.startswith("max_new_tokens")).split()[1:] == ["512", "default"]


def test_a_config_that_does_not_match_the_weights_is_one_line(checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "mismatch"
    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["ask", "--model", str(folder), "--device", "cpu", "hi"])
    assert result.exit_code == 1
    assert [line for line in result.stderr.splitlines() if not line.startswith("Warning:")] == [
        f"Error: the weights in {folder} do not have the sizes its config.json describes (the config is from"
        " another model); download the checkpoint again"
    ]


# -------------------------------------------------------------------------------- 12. read-only home
def test_resume_with_a_journal_that_cannot_be_written(paths: UserPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    session = new_session(paths, "ro")
    session.add_turn(Turn(user="u", answer="a", answer_ids=[]))
    session.close()

    def read_only(path: Path, record: dict) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("bluelm_cli.session.append_record", read_only)
    resumed = Session.resume(paths.sessions_dir, "ro")
    assert [t.user for t in resumed.turns] == ["u"]
    assert "can't be written (Read-only file system): new turns are kept in memory only; /save PATH" in resumed.warnings[-1]


# ------------------------------------------------------------------------------------ 15. script mode
def test_script_mode_reports_a_non_utf8_line_and_goes_on(paths: UserPaths) -> None:
    chat = Chat(FakeBackend().queue("one", "two"), new_session(paths))
    stdin = io.TextIOWrapper(io.BytesIO(b"first\n\xff\xfe bad\nsecond\n"), encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    status = run_chat(chat, console=Console(file=out), paths=paths, stdin=stdin, err_console=Console(file=err, width=300))
    assert status == 1
    assert out.getvalue() == "one\ntwo\n"
    assert err.getvalue() == (
        "Error: line 2 of standard input is not valid UTF-8 and was skipped; convert it first, e.g. with iconv -t UTF-8\n"
    )


# ------------------------------------------------------------------------------------------ 16. smaller
def test_context_used_counts_the_system_prompt_and_turns_are_counted_in_words(paths: UserPaths) -> None:
    chat = Chat(FakeBackend().queue("x"), new_session(paths))
    repl = repl_for(chat)
    repl.handle("/set system abcd")
    assert chat.context_used() == 5  # <s> + 4 characters
    repl.handle("hello")
    repl.handle("/show")
    screen = repl.out.console.file.getvalue()  # type: ignore[attr-defined]
    assert "r · 1 turn, 1 in the context" in screen


def test_config_columns_align_with_wide_characters(monkeypatch: pytest.MonkeyPatch, paths: UserPaths) -> None:
    paths.config_file.parent.mkdir(parents=True, exist_ok=True)
    paths.config_file.write_text('system = "你是一个简洁的助手。"\n')
    result = runner.invoke(app, ["config"])
    from rich.cells import cell_len

    rows = [line for line in result.stdout.splitlines() if line.startswith(("system", "seed"))]
    assert len(rows) == 2
    # The source column starts in the same terminal cell on both rows (CJK characters take two cells).
    source_columns = {cell_len(line) - cell_len(re.split(r" {2,}", line)[-1]) for line in rows}
    assert len(source_columns) == 1, rows


def test_notes_wrap_between_words(paths: UserPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm-256color")  # rich leaves a dumb terminal's lines alone
    console = Console(file=io.StringIO(), width=40, force_terminal=True, color_system=None)
    ChatOutput(console).note("(the 3 oldest turns no longer fit the context window and were dropped)")
    lines = console.file.getvalue().splitlines()
    assert len(lines) > 1 and all(len(line) <= 40 for line in lines)
    words = " ".join(lines).split()
    assert words == "(the 3 oldest turns no longer fit the context window and were dropped)".split()


def test_load_of_a_file_without_sampling_keeps_the_settings(paths: UserPaths, tmp_path: Path) -> None:
    chat = Chat(FakeBackend(), new_session(paths))
    chat.set_setting("max_new_tokens", "64")
    saved = tmp_path / "nosampling.json"
    saved.write_text(json.dumps({"format": "bluelm-cli.session", "version": 1, "model_id": "fake/BlueLM",
                                 "turns": [{"user": "u", "answer": "a"}]}))
    repl_for(chat).handle(f"/load {saved}")
    assert chat.sampling.max_new_tokens == 64 and [t.user for t in chat.session.turns] == ["u"]


def test_unknown_option_suggests_only_close_names() -> None:
    far = runner.invoke(app, ["ask", "--frobnicate", "x"])
    assert far.exit_code == 2 and far.stderr == "Error: No such option: --frobnicate (see 'bluelm ask --help')\n"
    near = runner.invoke(app, ["ask", "--truncat", "x"])
    assert near.stderr == "Error: No such option: --truncat; did you mean --truncate? (see 'bluelm ask --help')\n"


# -------------------------------------------------------------------- the second campaign's findings
def test_save_through_a_link_to_a_journal_is_refused(paths: UserPaths, tmp_path: Path) -> None:
    session = new_session(paths, "linked")
    session.add_turn(Turn(user="keep me", answer="a", answer_ids=[]))
    link = tmp_path / "innocent.json"
    link.symlink_to(session.journal)  # type: ignore[arg-type]
    with pytest.raises(BlueLMError, match="is a session journal, which bluelm keeps itself"):
        session.save(link)
    session.close()
    assert [t.user for t in Session.resume(paths.sessions_dir, "linked").turns] == ["keep me"]


def test_load_refuses_what_is_not_a_regular_file(paths: UserPaths, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    with pytest.raises(BlueLMError, match="is not a regular file; give the path of a saved session"):
        Session.load(fifo)  # would wait forever for a writer
    journal_fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(journal_fifo)
    with pytest.raises(BlueLMError, match="is not a regular file"):
        Session.load(journal_fifo)  # a journal is read whole too: the same wait
    with pytest.raises(BlueLMError, match="there is no user 'nosuchuser"):
        Session.load(Path("~nosuchuser/x.json"))


def test_save_names_a_path_that_is_too_long(paths: UserPaths, tmp_path: Path) -> None:
    session = new_session(paths)
    longest = tmp_path / ("d" * 250 + ".json")  # 255 bytes: the longest name a file can have
    assert session.save(longest) == longest and longest.is_file()  # its temporary name must fit too
    with pytest.raises(BlueLMError, match="too long; choose a shorter one"):
        session.save(tmp_path / ("e" * 300 + ".json"))


def _copy(checkpoint: Path, tmp_path: Path, name: str) -> Path:
    import shutil

    folder = tmp_path / name
    shutil.copytree(checkpoint, folder)
    return folder


def _ask_error(folder: Path) -> list[str]:
    result = runner.invoke(app, ["ask", "--model", str(folder), "--device", "cpu", "-n", "3", "hi"])
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    return [line for line in result.stderr.splitlines() if not line.startswith("Warning:")]


def test_a_weight_index_naming_files_outside_the_folder_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    for target in ("/dev/zero", "../../../../etc/passwd"):
        folder = _copy(checkpoint, tmp_path, f"index{len(target)}")
        index = folder / "pytorch_model.bin.index.json"
        data = json.loads(index.read_text())
        first = next(iter(data["weight_map"]))
        data["weight_map"][first] = target
        index.write_text(json.dumps(data))
        assert _ask_error(folder) == [
            f"Error: {index} names {target!r}, which is not a file in {folder}; the index is damaged"
        ]


def test_weights_the_config_does_not_describe_are_refused(checkpoint: Path, tmp_path: Path) -> None:
    folder = _copy(checkpoint, tmp_path, "fewer")
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] -= 1
    (folder / "config.json").write_text(json.dumps(config))
    (line,) = _ask_error(folder)
    assert line.startswith(f"Error: the weights in {folder} hold ") and "its config.json does not describe" in line


@pytest.mark.parametrize(("key", "value"), [("vocab_size", "lots"), ("max_position_embeddings", 0)])
def test_an_invalid_config_value_is_one_line(checkpoint: Path, tmp_path: Path, key: str, value: object) -> None:
    folder = _copy(checkpoint, tmp_path, f"bad-{key}")
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    (line,) = _ask_error(folder)
    assert line.startswith(f"Error: {folder / 'config.json'} ")


def test_a_system_prompt_that_leaves_no_room_says_so(paths: UserPaths) -> None:
    chat = Chat(FakeBackend(context_limit=128), new_session(paths))
    chat.set_setting("max_new_tokens", "16")
    with pytest.raises(BlueLMError, match=r"^the system prompt is 200 tokens but at most 108 fit in the 128-token"):
        chat.set_setting("system", "s" * 200)
    chat.session.set_setting("system", "s" * 200)  # a journal from before that check
    with pytest.raises(BlueLMError, match=r"^the system prompt is 200 tokens but at most 108 fit in the 128-token"):
        chat.send("hi")


def test_config_file_with_a_bom_and_a_home_that_is_a_file(paths: UserPaths, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    paths.config_file.parent.mkdir(parents=True, exist_ok=True)
    paths.config_file.write_bytes(b'\xef\xbb\xbftemperature = 0.25\n')
    shown = runner.invoke(app, ["config"])
    assert shown.exit_code == 0 and next(l for l in shown.stdout.splitlines() if l.startswith("temperature")).split()[1] == "0.25"
    home_file = tmp_path / "home-file"
    home_file.write_text("")
    monkeypatch.setenv("BLUELM_HOME", str(home_file))
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 1
    assert result.stderr == f"Error: {home_file} is a file, not a folder; point BLUELM_HOME at a folder (or remove that file)\n"


def test_a_history_file_that_stops_being_writable_is_one_warning(paths: UserPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    from prompt_toolkit.history import FileHistory

    from bluelm_cli.ui.repl import _open_history

    repl = repl_for(Chat(FakeBackend(), new_session(paths)))
    history = _open_history(repl, paths.history_file)

    def full(self: FileHistory, string: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileHistory, "store_string", full)
    history.store_string("one")
    history.store_string("two")
    text = repl.out.console.file.getvalue()  # type: ignore[attr-defined]
    assert text.count("Warning: the prompt history is no longer written") == 1 and "No space left" in text


@pytest.mark.slow
def test_an_answer_that_cannot_be_written_is_kept_and_reported(checkpoint: Path, tmp_path: Path) -> None:
    """stdout on a full device (and an encoding that can't hold the answer): one line, exit 1, never an
    abort from the model's worker (exit 134), and `ask --session` still journals the turn."""
    home = tmp_path / "home"
    env = {**os.environ, "BLUELM_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "ascii"}
    command = [sys.executable, "-m", "bluelm_cli", "ask", "--model", str(checkpoint), "--device", "cpu",
               "-n", "40", "-t", "0", "--session", "out", "你好"]
    with open(os.devnull, "w") as sink:
        result = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.PIPE,
                                text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if not line.startswith(("Warning:", "Loaded"))]
    assert result.returncode in (0, 1), result.stderr
    if result.returncode == 1:
        assert len(lines) == 1 and lines[0].startswith("Error: the answer could not be written to standard output")
    turns = [r for r in map(json.loads, (home / "sessions" / "out.jsonl").read_text().splitlines()) if r["type"] == "turn"]
    assert len(turns) == 1


def test_closed_standard_streams_are_one_line(checkpoint: Path, tmp_path: Path) -> None:
    env = {**os.environ, "BLUELM_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    closed_stdout = subprocess.run(
        [sys.executable, "-c", "import os, sys; os.close(1); sys.stdout = None; "
         "sys.argv = ['bluelm', 'ask', 'hi']; from bluelm_cli.cli.app import main; main()"],
        env=env, capture_output=False, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, timeout=120,
    )
    assert closed_stdout.returncode == 1
    assert closed_stdout.stderr == "Error: standard output is closed; give bluelm a terminal, a file or a pipe to write to\n"


# --------------------------------------------------------------------- the third campaign's findings
def test_an_argument_that_is_not_utf8_is_a_usage_error_naming_it(checkpoint: Path) -> None:
    """A non-UTF-8 byte in an argument (`bluelm ask $'caf\\xe9'`, `-s $'\\x9b'`) reaches Python as a lone
    surrogate; it failed after the load with sentencepiece's "Unable to cast Python instance…", exit 1."""
    result = runner.invoke(app, ["ask", "--model", str(checkpoint), "-n", "3", "caf\udce9 x"])
    assert result.exit_code == 2
    assert result.stderr == (
        "Error: the argument 'caf\ufffd x' is not valid UTF-8 (byte 3); convert it first, e.g. with iconv -t UTF-8\n"
    )
    system = runner.invoke(app, ["ask", "--model", str(checkpoint), "-s", "\udc9b31m", "hi"])
    assert system.exit_code == 2 and "is not valid UTF-8 (byte 0)" in system.stderr


@pytest.mark.parametrize("where", ["sessions", "home"])
def test_sessions_says_when_a_file_stands_where_its_folder_should_be(
    where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bluelm sessions` said "No sessions yet" (exit 0) where the sessions folder or BLUELM_HOME is a file."""
    home = tmp_path / "home"
    if where == "home":
        home.write_text("")
        blocker = home
    else:
        home.mkdir()
        blocker = home / "sessions"
        blocker.write_text("")
    monkeypatch.setenv("BLUELM_HOME", str(home))
    expected = f"Error: {blocker} is a file, not a folder; point BLUELM_HOME at a folder (or remove that file)\n"
    for command in (["sessions"], ["sessions", "search", "hi"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 1 and result.stderr == expected


@pytest.mark.slow
def test_a_chat_started_with_stderr_closed_answers_and_journals(checkpoint: Path, tmp_path: Path) -> None:
    """`bluelm chat 2>&-` died at its first warning (sys.stderr is None) with exit 1 and lost the turn; and a
    closed descriptor 2 would be handed to the next file opened, so stray stderr writes landed in it."""
    home = tmp_path / "home"
    env = {**os.environ, "BLUELM_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "bluelm_cli", "chat", "--model", str(checkpoint), "-n", "3", "--session", "quiet"],
        env=env, input="hi\n", stdout=subprocess.PIPE, preexec_fn=lambda: os.close(2), text=True, timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip()
    records = [json.loads(line) for line in (home / "sessions" / "quiet.jsonl").read_text().splitlines()]
    assert [record["type"] for record in records] == ["start", "message", "turn"] and records[2]["user"] == "hi"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1])
@pytest.mark.slow
def test_ask_session_journals_an_answer_ended_by_a_signal(signum: int, tmp_path: Path) -> None:
    """`bluelm ask --session` killed mid-answer by SIGTERM/SIGHUP (a supervisor, a dropped SSH connection)
    lost the turn (Ctrl-C kept it); now it is journaled as interrupted, and the exit status names the signal."""
    from fake_openai import FakeOpenAI, Handler, chunk

    release = threading.Event()

    def partial_then_hang(handler: Handler, _: object) -> None:
        handler.start_events()
        handler.send_chunk(chunk("Partial"))
        release.wait(60)

    server = FakeOpenAI()
    server.routes[("POST", "/v1/chat/completions")] = partial_then_hang
    home = tmp_path / "home"
    env = {**os.environ, "BLUELM_HOME": str(home)}

    def default_signals() -> None:  # a test run under nohup must not hand its ignored SIGHUP on
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    proc = subprocess.Popen(
        [sys.executable, "-m", "bluelm_cli", "ask", "--api", server.url, "--session", "sig", "hi"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_signals,
    )
    try:
        assert proc.stdout is not None and proc.stdout.read(len("Partial")) == b"Partial"  # the answer is streaming
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 128 + signum
    finally:
        release.set()
        proc.kill()
        server.close()
    turns = [r for r in map(json.loads, (home / "sessions" / "sig.jsonl").read_text().splitlines()) if r["type"] == "turn"]
    assert [(t["user"], t["answer"], t["finish_reason"]) for t in turns] == [("hi", "Partial", "interrupted")]


def test_a_file_without_a_size_is_read_only_up_to_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ask -f /dev/zero` read forever (its size is 0, so the size check passed): a device or a pipe is
    now read up to the limit and refused past it; a small pipe (`-f <(git diff)`) still works."""
    from bluelm_cli.chat import attachments

    monkeypatch.setattr(attachments, "MAX_FILE_BYTES", 1024)
    read_end, write_end = os.pipe()
    os.write(write_end, b"a" * 2048)
    os.close(write_end)
    try:
        with pytest.raises(BlueLMError) as refused:
            attachments.read_attachment(f"/dev/fd/{read_end}")
    finally:
        os.close(read_end)
    assert str(refused.value) == (
        f"/dev/fd/{read_end} gives more than 1.0 KB, far more than fits the context window; give a smaller file or an excerpt"
    )
    read_end, write_end = os.pipe()
    os.write(write_end, b"small\n")
    os.close(write_end)
    try:
        assert attachments.read_attachment(f"/dev/fd/{read_end}").size_bytes == 6
    finally:
        os.close(read_end)


@pytest.mark.parametrize("export_format", ["hf", "gguf"])
@pytest.mark.slow
def test_an_export_that_cannot_be_written_is_one_line_and_leaves_nothing(
    export_format: str, checkpoint: Path, tmp_path: Path
) -> None:
    """A full disk (here: a file-size limit, EFBIG) during `bluelm export` gave "SafetensorError: …" or
    "OSError: 38400 requested and 12592 written" and left a half-written OUT folder."""
    import resource

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    out = tmp_path / ("out" if export_format == "hf" else "out.gguf")
    env = {**os.environ, "BLUELM_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "bluelm_cli", "export", "--model", str(checkpoint), "--format", export_format, str(out)],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, preexec_fn=small_files, timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(f"Error: cannot write {out} (")
    assert result.stderr.splitlines()[-1].endswith("); free some space or choose another OUT")
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_sessions_show_with_two_formats_is_a_usage_error(paths: UserPaths) -> None:
    new_session(paths, "both").close()
    result = runner.invoke(app, ["sessions", "show", "both", "--json", "--markdown"])
    assert (result.exit_code, result.stderr) == (2, "Error: choose one of --json and --markdown\n")


@pytest.mark.slow
def test_a_chat_whose_stderr_is_on_a_full_disk_answers_and_journals(checkpoint: Path, tmp_path: Path) -> None:
    """`bluelm chat 2>/dev/full` (a log on a full partition) exited 1 at its first warning, before it had
    answered or journaled anything; a lost diagnostic must not cost the turn."""
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    home = tmp_path / "home"
    env = {**os.environ, "BLUELM_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "bluelm_cli", "chat", "--model", str(checkpoint), "-n", "3", "--session", "full"],
            env=env, input="hi\n", stdout=subprocess.PIPE, stderr=full, text=True, timeout=300,
        )
    assert result.returncode == 0 and result.stdout.strip()
    records = [json.loads(line) for line in (home / "sessions" / "full.jsonl").read_text().splitlines()]
    assert [record["type"] for record in records] == ["start", "message", "turn"]


def test_sessions_rm_refuses_a_session_open_in_a_chat(paths: UserPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    """`bluelm sessions rm NAME` deleted the journal under a running chat, whose later turns then went
    nowhere ("not in the session journal … and are lost")."""
    from bluelm_cli.chat import journal

    monkeypatch.setattr(journal, "_holder_command", "chat")  # this process holds "busy" as a chat would
    busy = new_session(paths, "busy")
    new_session(paths, "idle").close()
    result = runner.invoke(app, ["sessions", "rm", "idle", "busy"])
    assert (result.exit_code, result.stderr) == (
        1, f"Error: session 'busy' is open in a bluelm chat (process {os.getpid()}); end that chat first, then remove it\n")
    assert sorted(p.name for p in paths.sessions_dir.glob("*.jsonl")) == ["busy.jsonl", "idle.jsonl"]  # nothing deleted
    busy.close()
    assert runner.invoke(app, ["sessions", "rm", "idle", "busy"]).exit_code == 0
    assert not list(paths.sessions_dir.glob("*.jsonl"))


@pytest.mark.parametrize("export_format", ["hf", "gguf"])
@pytest.mark.parametrize("field, value", [("hidden_size", 128), ("num_hidden_layers", 1), ("intermediate_size", 96)])
def test_an_export_refuses_weights_whose_sizes_its_config_does_not_describe(
    export_format: str, field: str, value: int, checkpoint: Path, tmp_path: Path
) -> None:
    """A config.json edited away from its weights exported "successfully" into a folder whose config did not
    match its tensors (campaign 3, X12); chat and ask already refuse such a checkpoint."""
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config[field] != value
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    out = tmp_path / ("out" if export_format == "hf" else "out.gguf")
    result = runner.invoke(app, ["export", "--model", str(folder), "--format", export_format, str(out)])
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"Error: the weights in {folder} do not have the sizes its config.json describes (")
    assert result.stderr.endswith("); export a checkpoint whose config.json came with its weights\n")
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
