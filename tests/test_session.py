"""Session: journal replay and crash recovery, atomic save, load errors, listing."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from bluelm_cli.core.errors import BlueLMError, UsageError
from bluelm_cli.session import Session, Turn, list_sessions, validate_session_name
from bluelm_cli.core.settings import SamplingSettings

MODEL = "vivo-ai/BlueLM-7B-Chat"
# What an earlier `/save x.json` left: /save replaces only its own saves (and empty files), never other files.
EARLIER_SAVE = '{"format": "bluelm-cli.session", "version": 1, "model_id": "m", "turns": []}\n'


@pytest.fixture
def sessions_dir(tmp_path: Path) -> Path:
    return tmp_path / "sessions"


def turn(user: str, answer: str = "", ids: list[int] | None = None, reason: str = "stop") -> Turn:
    return Turn(user=user, answer=answer or f"answer to {user}", answer_ids=ids or [1, 2, 3], finish_reason=reason)


def new(sessions_dir: Path, name: str | None = "chat", **kw: object) -> Session:
    return Session.new(sessions_dir, name=name, model_id=MODEL, system=kw.get("system"), sampling=kw.get("sampling"))


def journal_records(session: Session) -> list[dict]:
    assert session.journal is not None
    return [json.loads(line) for line in session.journal.read_text("utf-8").splitlines()]


# --------------------------------------------------------------------------- journal
def test_new_starts_journal(sessions_dir: Path) -> None:
    session = new(sessions_dir, sampling=SamplingSettings(temperature=0.2), system="be brief")
    assert session.journal == sessions_dir / "chat.jsonl"
    (start,) = journal_records(session)
    assert start["type"] == "start" and start["version"] == 1 and start["model_id"] == MODEL
    assert start["system"] == "be brief" and start["sampling"]["temperature"] == 0.2
    assert (sessions_dir.stat().st_mode & 0o777) == 0o700


def test_default_name_is_a_timestamp_and_unique(sessions_dir: Path) -> None:
    a, b = new(sessions_dir, name=None), new(sessions_dir, name=None)
    assert a.name != b.name
    assert a.name[:4].isdigit() and len(a.name.split("-")) >= 4
    assert b.journal is not None and b.journal.exists()


def test_new_with_existing_name_is_refused(sessions_dir: Path) -> None:
    new(sessions_dir)
    with pytest.raises(UsageError, match="session 'chat' already exists"):
        new(sessions_dir)


@pytest.mark.parametrize("bad", ["a/b", "..", ".hidden", "", "a b", "x" * 101, "a\\b"])
def test_bad_session_names(bad: str) -> None:
    with pytest.raises(UsageError, match="invalid session name"):
        validate_session_name(bad)


def test_good_session_names() -> None:
    for good in ("work", "2026-11-25_notes.v2", "翻译"):
        assert validate_session_name(good) == good


def test_every_change_is_journaled_and_replayed(sessions_dir: Path) -> None:
    session = new(sessions_dir, system="old system")
    session.add_turn(turn("one"))
    session.add_turn(turn("two"))
    session.reset()
    assert session.turns == [] and session.system == "old system"
    session.add_turn(turn("three"))
    session.add_turn(turn("four"))
    session.add_turn(turn("five", reason="interrupted"))
    undone = session.undo()
    assert undone is not None and undone.user == "five" and undone.finish_reason == "interrupted"
    assert session.turns[-1].user == "four"
    session.add_turn(turn("six"))
    retried = session.undo()
    assert retried is not None and retried.user == "six"
    assert session.set_setting("temperature", "0") == 0.0
    session.set_setting("seed", "7")
    session.set_setting("system", "new system")
    session.add_turn(turn("seven"))
    session.drop_oldest(1)
    assert [t.user for t in session.active_turns()] == ["four", "seven"]

    types = [r["type"] for r in journal_records(session)]
    assert types == ["start", "turn", "turn", "reset", "turn", "turn", "turn", "undo", "turn", "undo",
                     "set", "set", "set", "turn", "drop"]

    resumed = Session.resume(sessions_dir, "chat")
    assert resumed == session
    assert [t.user for t in resumed.turns] == ["three", "four", "seven"]
    assert resumed.context_start == 1
    assert resumed.system == "new system"
    assert resumed.sampling["temperature"] == 0.0 and resumed.sampling["seed"] == 7
    assert resumed.warnings == []


def test_set_setting_validates_through_settings(sessions_dir: Path) -> None:
    session = new(sessions_dir)
    before = journal_records(session)
    with pytest.raises(UsageError, match="top_p must be a number greater than 0 and at most 1, got '2'"):
        session.set_setting("top_p", "2")
    with pytest.raises(UsageError, match="device can't be changed"):
        session.set_setting("device", "cpu")
    assert journal_records(session) == before


def test_undo_and_retry_on_empty_session(sessions_dir: Path) -> None:
    session = new(sessions_dir)
    assert session.undo() is None and session.undo() is None
    assert len(journal_records(session)) == 1


def test_drop_is_clamped_and_undo_keeps_context_start_valid(sessions_dir: Path) -> None:
    session = new(sessions_dir)
    session.add_turn(turn("a"))
    session.add_turn(turn("b"))
    session.drop_oldest(5)
    assert session.context_start == 2 and session.active_turns() == []
    session.undo()
    assert session.context_start == 1
    assert Session.resume(sessions_dir, "chat").context_start == 1


def test_adopt_is_journaled(sessions_dir: Path, tmp_path: Path) -> None:
    other = new(sessions_dir, name="other", system="他人", sampling={"temperature": 0.1})
    other.add_turn(turn("你好", "你好！😀"))
    other.drop_oldest(1)
    saved = other.save(tmp_path / "other.json")

    session = new(sessions_dir)
    session.add_turn(turn("mine"))
    loaded = Session.load(saved)
    session.adopt(loaded)
    assert session.name == "chat" and session.model_id == MODEL
    assert [t.user for t in session.turns] == ["你好"] and session.system == "他人"
    assert session.sampling["temperature"] == 0.1 and session.context_start == 1
    session.add_turn(turn("after"))

    resumed = Session.resume(sessions_dir, "chat")
    assert [t.user for t in resumed.turns] == ["你好", "after"]
    assert resumed.system == "他人" and resumed.context_start == 1
    assert journal_records(session)[2]["type"] == "load"


def test_truncated_last_line_is_recovered(sessions_dir: Path) -> None:
    session = new(sessions_dir)
    session.add_turn(turn("one"))
    session.add_turn(turn("two"))
    assert session.journal is not None
    with open(session.journal, "ab") as f:  # a crash in the middle of writing the third turn
        f.write(b'{"type":"turn","user":"thr')

    resumed = Session.resume(sessions_dir, "chat")
    assert [t.user for t in resumed.turns] == ["one", "two"]
    resumed.add_turn(turn("three"))  # must land on its own line
    again = Session.resume(sessions_dir, "chat")
    assert [t.user for t in again.turns] == ["one", "two", "three"]
    assert again.warnings == []


def test_last_record_without_newline_is_kept(sessions_dir: Path) -> None:
    session = new(sessions_dir)
    session.add_turn(turn("one"))
    assert session.journal is not None
    session.journal.write_bytes(session.journal.read_bytes().rstrip(b"\n"))
    resumed = Session.resume(sessions_dir, "chat")
    resumed.add_turn(turn("two"))
    assert [t.user for t in Session.resume(sessions_dir, "chat").turns] == ["one", "two"]


def test_damaged_middle_line_is_skipped_with_warning(sessions_dir: Path) -> None:
    session = new(sessions_dir)
    session.add_turn(turn("one"))
    assert session.journal is not None
    with open(session.journal, "ab") as f:
        f.write(b"garbage\n")
        f.write(b'{"type":"turn","user":5}\n')
    session.add_turn(turn("two"))
    resumed = Session.resume(sessions_dir, "chat")
    assert [t.user for t in resumed.turns] == ["one", "two"]
    assert len(resumed.warnings) == 2 and "line 3" in resumed.warnings[0]


def test_journal_is_written_with_fsync(sessions_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    session = new(sessions_dir)
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    session.add_turn(turn("one"))
    assert synced


def test_journal_write_failure_is_reported_once(sessions_dir: Path) -> None:
    session = new(sessions_dir)
    assert session.journal is not None
    session.journal.unlink()
    with pytest.raises(BlueLMError, match="could not write the session journal"):
        session.add_turn(turn("one"))
    assert [t.user for t in session.turns] == ["one"]  # the conversation goes on in memory
    session.add_turn(turn("two"))  # no second error


def test_resume_errors(sessions_dir: Path) -> None:
    with pytest.raises(BlueLMError, match="no saved sessions"):
        Session.resume(sessions_dir, None)
    new(sessions_dir, name="alpha")
    with pytest.raises(BlueLMError, match="no session named 'beta'.*known sessions: alpha"):
        Session.resume(sessions_dir, "beta")
    (sessions_dir / "foreign.jsonl").write_text('{"hello": 1}\n')
    with pytest.raises(BlueLMError, match="not a bluelm session journal"):
        Session.resume(sessions_dir, "foreign")
    with pytest.raises(UsageError):
        Session.resume(sessions_dir, "../alpha")


# --------------------------------------------------------------------------- listing
def test_list_sessions_most_recent_first_and_resume_most_recent(sessions_dir: Path) -> None:
    assert list_sessions(sessions_dir) == []
    for i, name in enumerate(["old", "newest", "middle"]):
        s = new(sessions_dir, name=name)
        for k in range(i):
            s.add_turn(turn(f"{name}{k}"))
    (sessions_dir / "junk.jsonl").write_text("not json\n")
    times = {"old": 1_000_000, "middle": 2_000_000, "newest": 3_000_000}
    for name, t in times.items():
        os.utime(sessions_dir / f"{name}.jsonl", (t, t))

    infos = list_sessions(sessions_dir)
    # A file that can't be read at all is listed as such (never hidden), and never resumed as "the latest".
    assert [i.name for i in infos if i.unreadable] == ["junk"]
    infos = [i for i in infos if not i.unreadable]
    assert [i.name for i in infos] == ["newest", "middle", "old"]
    assert [i.turns for i in infos] == [1, 2, 0]
    assert infos[0].path == sessions_dir / "newest.jsonl" and infos[0].model_id == MODEL
    assert infos[0].last_used.timestamp() == 3_000_000 and infos[0].last_used.tzinfo is not None

    resumed = Session.resume(sessions_dir, None)
    assert resumed.name == "newest"
    later = time.time() + 1000  # resuming "newest" just made it the most recently used
    os.utime(sessions_dir / "old.jsonl", (later, later))
    assert Session.resume(sessions_dir, None).name == "old"


def test_resume_marks_session_as_used(sessions_dir: Path) -> None:
    new(sessions_dir, name="a")
    new(sessions_dir, name="b")
    os.utime(sessions_dir / "a.jsonl", (1_000_000, 1_000_000))
    os.utime(sessions_dir / "b.jsonl", (2_000_000, 2_000_000))
    Session.resume(sessions_dir, "a")
    assert list_sessions(sessions_dir)[0].name == "a"


# --------------------------------------------------------------------------- save / load
def _sample(sessions_dir: Path) -> Session:
    session = new(sessions_dir, system="你是 BlueLM", sampling={"temperature": 0.3, "seed": 1})
    session.add_turn(Turn("写一首诗 🌸", "春眠不觉晓 🐦\n处处闻啼鸟", [101, 202, 303], "stop", "2026-11-25T14:05:01+00:00"))
    session.add_turn(Turn("Continue", "And then", [7], "interrupted", "2026-11-25T14:06:01+00:00"))
    session.add_turn(Turn("Long", "cut", [], "length", "2026-11-25T14:07:01+00:00"))
    return session


def test_json_round_trip_with_chinese_and_emoji(sessions_dir: Path, tmp_path: Path) -> None:
    session = _sample(sessions_dir)
    session.drop_oldest(1)
    path = session.save(tmp_path / "chat.json")
    raw = path.read_text("utf-8")
    assert "春眠不觉晓 🐦" in raw  # readable, not \u escapes
    data = json.loads(raw)
    assert data["format"] == "bluelm-cli.session" and data["version"] == 1 and data["saved_at"]
    assert data["model_id"] == MODEL
    loaded = Session.load(path)
    assert loaded == session
    assert loaded.journal is None and loaded.turns[0].answer_ids == [101, 202, 303]
    assert loaded.turns[1].finish_reason == "interrupted"
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def test_save_without_md_suffix_is_json(sessions_dir: Path, tmp_path: Path) -> None:
    path = _sample(sessions_dir).save(tmp_path / "chat")
    assert json.loads(path.read_text("utf-8"))["format"] == "bluelm-cli.session"


def test_markdown_transcript(sessions_dir: Path, tmp_path: Path) -> None:
    path = _sample(sessions_dir).save(tmp_path / "chat.md")
    text = path.read_text("utf-8")
    assert text.startswith("# BlueLM chat: chat\n")
    assert MODEL in text and "你是 BlueLM" in text
    assert text.count("**You:**") == 3 and text.count("**BlueLM:**") == 3
    assert "写一首诗 🌸" in text and "春眠不觉晓 🐦\n处处闻啼鸟" in text
    assert "And then *(interrupted)*" in text
    assert text.index("写一首诗") < text.index("Continue") < text.index("Long")
    with pytest.raises(BlueLMError, match="Markdown transcript"):
        Session.load(path)


def test_save_over_an_earlier_save_replaces_it(sessions_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "chat.json"
    target.write_text(EARLIER_SAVE)
    _sample(sessions_dir).save(target)
    assert Session.load(target).turns[0].user == "写一首诗 🌸"


def test_save_to_missing_dir_fails_cleanly(sessions_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BlueLMError, match="does not exist"):
        _sample(sessions_dir).save(tmp_path / "nope" / "chat.json")
    assert not (tmp_path / "nope").exists()


def test_save_under_a_regular_file_fails_cleanly(sessions_dir: Path, tmp_path: Path) -> None:
    parent = tmp_path / "file"
    parent.write_text("keep me")
    with pytest.raises(BlueLMError, match="is not a directory"):
        _sample(sessions_dir).save(parent / "chat.json")
    assert parent.read_text() == "keep me"


def test_failed_save_leaves_existing_file_untouched(
    sessions_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "chat.json"
    target.write_text(EARLIER_SAVE)

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(BlueLMError, match="No space left on device.*unchanged"):
        _sample(sessions_dir).save(target)
    assert target.read_text() == EARLIER_SAVE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json", "sessions"]


def _save_as_nobody(path: Path) -> str:
    """Try the save in a forked child that has dropped root for `nobody`; what it raised (or "saved")."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no exec, everything is imported already
        message = "saved"
        try:
            os.setgid(65534)
            os.setuid(65534)
            Session(name="x", model_id="m").save(path)
        except BlueLMError as exc:
            message = str(exc)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            message = f"{type(exc).__name__}: {exc}"
        finally:
            os.write(write_end, message.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    return message


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_save_to_unwritable_dir(sessions_dir: Path, tmp_path: Path) -> None:
    """A folder the user can't write to, for real; as root (CI runs as root) the save runs as `nobody`."""
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "chat.json").write_text(EARLIER_SAVE)
    try:
        if os.geteuid() == 0:
            for folder in (tmp_path, *tmp_path.parents):  # nobody must reach the folder, and no further
                if folder != Path("/"):
                    folder.chmod(folder.stat().st_mode | 0o011)
            locked.chmod(0o555)
            assert "not writable" in _save_as_nobody(locked / "chat.json")
        else:
            locked.chmod(0o500)
            with pytest.raises(BlueLMError, match="not writable"):
                _sample(sessions_dir).save(locked / "chat.json")
        assert (locked / "chat.json").read_text() == EARLIER_SAVE
    finally:
        locked.chmod(0o700)


def test_save_to_unwritable_dir_simulated(
    sessions_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    target = tmp_path / "chat.json"
    target.write_text(EARLIER_SAVE)

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    session = _sample(sessions_dir)  # its journal is made with mkstemp too
    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(BlueLMError, match="is not writable"):
        session.save(target)
    assert target.read_text() == EARLIER_SAVE


def test_save_to_a_directory_path(sessions_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BlueLMError, match="is a directory"):
        _sample(sessions_dir).save(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b'{"format": "something-else", "turns": []}', "not a bluelm session file"),
        (b"[1, 2]", "not a bluelm session file"),
        (b'{"format": "bluelm-cli.session", "version": 9, "model_id": "m", "turns": []}', "newer bluelm-cli"),
        (b'{"format": "bluelm-cli.session", "version": 1, "model_id": "m", "turns": [{"user": 1}]}', "damaged"),
        (b'{"format": "bluelm-cli.session", "version": 1, "model_id": "m", "turns": [],'
         b' "sampling": {"temperature": 7}}', "damaged"),
    ],
)
def test_load_errors_leave_current_session_untouched(
    sessions_dir: Path, tmp_path: Path, content: bytes | None, message: str
) -> None:
    current = _sample(sessions_dir)
    before = (list(current.turns), current.system, dict(current.sampling), current.journal.read_bytes())  # type: ignore[union-attr]
    path = tmp_path / "in.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BlueLMError) as info:
        current.adopt(Session.load(path))
    assert message in str(info.value) and str(path) in str(info.value)
    assert (list(current.turns), current.system, dict(current.sampling), current.journal.read_bytes()) == before  # type: ignore[union-attr]


def test_load_from_another_model_succeeds(sessions_dir: Path, tmp_path: Path) -> None:
    session = _sample(sessions_dir)
    session.model_id = "someone/Other-Model"
    loaded = Session.load(session.save(tmp_path / "x.json"))
    assert loaded.model_id == "someone/Other-Model"


def test_load_journal_file(sessions_dir: Path) -> None:
    session = _sample(sessions_dir)
    assert session.journal is not None
    loaded = Session.load(session.journal)
    assert loaded == session and loaded.journal is None
    loaded.add_turn(turn("not journaled"))
    assert len(Session.resume(sessions_dir, "chat").turns) == 3
