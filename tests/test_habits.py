"""What users of ollama, llm and aichat expect (issue 13), on the scripted fake backend: exact transcripts.

/continue, /file, \"\"\" blocks, ollama's words, /show info|parameters|system, foreign commands.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from bluelm_cli.chat.attachments import fenced, read_attachment
from bluelm_cli.core.backend import BackendInfo
from bluelm_cli.chat.service import Chat
from bluelm_cli.core.errors import BlueLMError
from bluelm_cli.core.finish import FinishReason
from bluelm_cli.ui.multiline import block_is_open, unwrap_block
from bluelm_cli.ui.output import ChatOutput
from bluelm_cli.config.paths import UserPaths, user_paths
from bluelm_cli.ui.repl import ChatRepl
from bluelm_cli.session import Session
from bluelm_cli.config.settings import resolve_settings
from bluelm_cli.ui.show import info_rows
from bluelm_cli.testing.fakes import FakeBackend, Scripted
from test_chat import journal, new_session, run_script


@pytest.fixture
def paths() -> UserPaths:
    return user_paths()


def repl_for(chat: Chat, paths: UserPaths, width: int = 100, **kwargs: object) -> tuple[ChatRepl, io.StringIO]:
    screen = io.StringIO()
    console = Console(file=screen, width=width)
    return ChatRepl(chat, ChatOutput(console, interactive=True), paths=paths, **kwargs), screen  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- /continue
def test_continue_goes_on_from_the_open_answer_and_replaces_the_turn(paths: UserPaths) -> None:
    backend = FakeBackend().queue("The answer is", "er is long.")
    chat = Chat(backend, new_session(paths, max_new_tokens="8"))
    stream = chat.send("q")
    assert "".join(stream) == "The answ"
    assert stream.finish().result.finish_reason is FinishReason.LENGTH
    created = chat.session.turns[0].created_at
    stream = chat.continue_()
    assert backend.prompt_text() == "<s>[|Human|]:q[|AI|]:The answ"  # left open: no </s>
    assert backend.plans[-1].partial_answer == "The answ"
    assert chat.session.turns[0].answer == "The answ"  # nothing changes until the commit
    assert "".join(stream) == "er is lo"
    stream.finish()
    turn = chat.session.turns[0]
    assert (len(chat.session.turns), turn.user, turn.answer, turn.finish_reason) == (1, "q", "The answer is lo", FinishReason.LENGTH)
    assert turn.answer_ids == backend.encoder.encode_plain("The answer is lo") and turn.created_at == created
    assert [r["type"] for r in journal(chat.session)][-3:] == ["turn", "undo", "turn"]
    assert journal(chat.session)[-1]["answer"] == "The answer is lo"


def test_continue_needs_a_cut_off_answer(paths: UserPaths) -> None:
    backend = FakeBackend().queue("Done.")
    chat = Chat(backend, new_session(paths))
    with pytest.raises(BlueLMError, match="^nothing to continue yet; send a message first$"):
        chat.continue_()
    stream = chat.send("hi")
    "".join(stream)
    stream.finish()
    with pytest.raises(BlueLMError, match="^the last answer ended on its own, so there is nothing to continue; /retry asks for a new one$"):
        chat.continue_()


def test_continue_after_an_interruption_in_the_repl(paths: UserPaths) -> None:
    backend = FakeBackend().queue(Scripted("one two three four", chunk=4, stop_after=1), "two three four")
    chat = Chat(backend, new_session(paths))
    repl, screen = repl_for(chat, paths)
    repl.handle("count")
    repl.handle("/continue")
    assert screen.getvalue() == "one \n[interrupted]\n\ntwo three four\n\n"
    assert backend.prompt_text() == "<s>[|Human|]:count[|AI|]:one "
    assert [(t.answer, t.finish_reason) for t in chat.session.turns] == [("one two three four", FinishReason.STOP)]


# ------------------------------------------------------------------------------------------- /file
def test_file_goes_into_the_next_message_fenced_with_its_name(paths: UserPaths, tmp_path: Path) -> None:
    source = tmp_path / "hello.py"
    source.write_text("print('hi')\n", encoding="utf-8")
    backend = FakeBackend().queue("It prints hi.", "Yes.")
    chat = Chat(backend, new_session(paths))
    status, out, err = run_script(chat, paths, f"/file {source}\n/file\nwhat does it do?\nand again?\n")
    assert status == 0 and err == ""
    block = f"{source}:\n```py\nprint('hi')\n```"
    assert out == (
        f"Attached {source} ({len(block)} tokens); it goes with your next message\n"
        f"Attached to the next message: {source} (/file clear drops them)\n"
        "It prints hi.\n"
        "Yes.\n"
    )
    assert backend.prompt_text(0) == f"<s>[|Human|]:{block}\n\nwhat does it do?[|AI|]:"
    assert backend.prompt_text(1).endswith("</s>[|Human|]:and again?[|AI|]:")  # attached once only


def test_the_same_file_attached_twice_goes_in_once_with_its_latest_text(paths: UserPaths, tmp_path: Path) -> None:
    # It went into the message twice (and counted twice against the context): "/file x", edit x, "/file x"
    # means the new text, once, however the path is spelled.
    source = tmp_path / "hello.py"
    source.write_text("print('old')\n", encoding="utf-8")
    backend = FakeBackend().queue("Fine.")
    chat = Chat(backend, new_session(paths))
    repl, screen = repl_for(chat, paths, width=300)
    repl.handle(f"/file {source}")
    source.write_text("print('new')\n", encoding="utf-8")
    repl.handle(f"/file {tmp_path}/./hello.py")
    repl.handle("/file")
    repl.handle("what does it do?")
    block = f"{tmp_path}/./hello.py:\n```py\nprint('new')\n```"
    assert screen.getvalue() == (
        f"Attached {source} ({len(block) - 2} tokens); it goes with your next message\n"
        f"Attached {tmp_path}/./hello.py again ({len(block)} tokens), in place of the earlier copy; it goes with your next message\n"
        f"Attached to the next message: {tmp_path}/./hello.py (/file clear drops them)\n"
        "Fine.\n\n"
    )
    assert backend.prompt_text(0) == f"<s>[|Human|]:{block}\n\nwhat does it do?[|AI|]:"


def test_file_refusals_say_why(paths: UserPaths, tmp_path: Path) -> None:
    binary, latin1, big = tmp_path / "a.bin", tmp_path / "latin1.txt", tmp_path / "big.txt"
    binary.write_bytes(b"\x7fELF\x00\x01")
    latin1.write_bytes("café".encode("latin-1"))
    big.write_text("x" * 3000, encoding="utf-8")
    chat = Chat(FakeBackend(context_limit=2048), new_session(paths))
    status, out, err = run_script(chat, paths, f"/file {binary}\n/file {latin1}\n/file {big}\n/file {tmp_path}/none\n/file clear\n/file\n")
    assert status == 1
    assert out == "Dropped 0 attached files\n"
    assert err == (
        f"Error: {binary} is a binary file (6 bytes); only text files can go into a message\n"
        f"Error: {latin1} is not UTF-8 text (byte 3); only text files can go into a message (convert it first, e.g. with iconv -t UTF-8)\n"
        f"Error: {big} is {len(fenced(str(big), 'x' * 3000)):,} tokens (2.9 KB) but at most 1,531 fit in the 2,048-token context window"
        " with room for a 512-token answer; give an excerpt, or lower max_new_tokens\n"
        f"Error: no such file: {tmp_path}/none\n"
        "Error: usage: /file PATH; the text file goes into your next message (/file clear drops attached files)\n"
    )


def test_fences_outgrow_the_backticks_inside() -> None:
    assert fenced("notes.md", "a\n```\ncode\n```\n") == "notes.md:\n````md\na\n```\ncode\n```\n````"
    assert fenced("Makefile", "all:\r\n\techo\r\n") == "Makefile:\n```\nall:\n\techo\n```"


def test_a_refused_message_keeps_its_file_attached(
    paths: UserPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    note = Path("n.txt")
    note.write_text("short", encoding="utf-8")
    backend = FakeBackend(context_limit=64).queue("ok")
    chat = Chat(backend, new_session(paths, max_new_tokens="16"))
    repl, screen = repl_for(chat, paths)
    repl.attachments.append(read_attachment(str(note)))
    repl.handle("y" * 40)  # with the file, more than fits
    assert repl.attachments and backend.plans == []
    repl.handle("ok?")
    assert repl.attachments == [] and backend.prompt_text() == f"<s>[|Human|]:{note}:\n```txt\nshort\n```\n\nok?[|AI|]:"


# ---------------------------------------------------------------------------------- """ blocks
def test_triple_quote_blocks() -> None:
    assert block_is_open('"""') and block_is_open('"""first line\nsecond')
    assert not block_is_open('"""one line"""') and not block_is_open('"""\nabc\n"""') and not block_is_open("plain")
    assert unwrap_block('"""\nline 1\nline 2\n"""') == "line 1\nline 2"
    assert unwrap_block('"""inline"""') == "inline" and unwrap_block("plain") == "plain"


def test_triple_quote_block_in_script_mode_is_one_message(paths: UserPaths) -> None:
    backend = FakeBackend().queue("Got it.", "Unclosed.")
    chat = Chat(backend, new_session(paths))
    status, out, err = run_script(chat, paths, '"""\n"""\n"""\nfirst line\n/not a command\n"""\n"""left open\nat the end\n')
    assert (status, out, err) == (0, "Got it.\nUnclosed.\n", "")
    assert backend.prompt_text(0) == "<s>[|Human|]:first line\n/not a command[|AI|]:"  # the empty block sent nothing
    assert backend.prompt_text(1).endswith("[|Human|]:left open\nat the end[|AI|]:")


# ---------------------------------------------------------------------------------- ollama's words
def test_ollama_words(paths: UserPaths) -> None:
    backend = FakeBackend().queue("One.", "Two.")
    chat = Chat(backend, new_session(paths))
    repl, screen = repl_for(chat, paths)
    for line in ("/set parameter temperature 0.2", "/set verbose", "hi", "/set quiet", "/clear", "again",
                 "/set wordwrap", "/system be brief", "!multi", ".continue", "/?", "/bye"):
        repl.handle(line)
    assert repl.exit_requested and chat.sampling.temperature == 0.2
    plan = len(backend.plans[0].ids)
    help_start = screen.getvalue().index("/help, /?")
    assert screen.getvalue()[:help_start] == (
        "temperature = 0.2\n"
        "Stats on\n"
        "One.\n"
        f"{plan} prompt tokens (0 reused) · 4 new · first token 50 ms · prefill {plan * 20} tokens/s · decode 100.0 tokens/s"
        f" · context {plan + 5}/2,048\n"
        "\n"
        "Stats off\n"
        f"New session {chat.session.name}; settings kept. The earlier turns stay in session t (bluelm chat --resume t).\n"
        "Two.\n"
        "\n"
        "Error: /set wordwrap is ollama's; answers always wrap at the terminal's width\n"
        "Error: unknown command /system; use /set system TEXT (/help lists them; //system sends it as a message)\n"
        "Error: !multi is llm chat's; here, start a multi-line message with \"\"\" and end it with \"\"\" (Alt-Enter also adds a line)\n"
        "Error: .continue is aichat's; here, use /continue\n"
    )
    listing = screen.getvalue()[help_start:]
    for usage in ("/help, /?", "/reset, /clear", "/exit, /quit, /bye", "/continue", "/file PATH", "/show [info|parameters|system|template]"):
        assert usage in listing
    assert backend.prompt_text(1) == "<s>[|Human|]:again[|AI|]:"  # /clear started a new conversation


def test_a_message_that_merely_starts_like_a_foreign_word_is_sent(paths: UserPaths) -> None:
    backend = FakeBackend().queue("Sure.")
    chat = Chat(backend, new_session(paths))
    status, out, err = run_script(chat, paths, "!multiline strings in bash?\n")
    assert (status, out, err) == (0, "Sure.\n", "")


# ------------------------------------------------------------------------------------------ /show
def test_show_info_parameters_and_system(paths: UserPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    paths.config_file.parent.mkdir(parents=True, exist_ok=True)
    paths.config_file.write_text("top_k = 40\nhistory = false\n", encoding="utf-8")
    settings = resolve_settings({"temperature": "0.5", "model": "/m"}, {}, paths.config_file)
    session = Session.new(paths.sessions_dir, name="t", model_id="fake/BlueLM", system=settings["system"],
                          sampling=settings.sampling())  # as bluelm chat starts one
    session.set_setting("system", "Be brief.")  # as /set would
    session.set_setting("max_new_tokens", "64")
    chat = Chat(FakeBackend().queue("ok"), session)
    repl, screen = repl_for(chat, paths, width=250, settings=settings)
    repl.handle("/show system")
    repl.handle("/show info")
    repl.handle("/show parameters")
    repl.handle("/show nonsense")
    config = f"config file {paths.config_file}"
    assert screen.getvalue() == (
        "Be brief.\n"
        "model         fake/BlueLM\n"
        "architecture  (unknown)\n"
        "parameters    (unknown)\n"
        "context       2,048 tokens\n"
        "dtype         float32\n"
        "device        cpu\n"
        "quantization  none\n"
        'model               "/m"                          flag\n'
        'source              "huggingface"                 default\n'
        'device              "auto"                        default\n'
        'dtype               "auto"                        default\n'
        "max_new_tokens      64                            session t (/set, /load or --resume)\n"
        "temperature         0.5                           flag\n"
        "top_p               0.9                           default\n"
        f"top_k               40                            {config}\n"
        "repetition_penalty  1.1                           default\n"
        "seed                (unset)                       default\n"
        'system              "Be brief."                   session t (/set, /load or --resume)\n'
        "api                 (unset)                       default\n"
        "compile             true                          default\n"
        'kv_cache            "model"                       default\n'
        "quantize            (unset)                       default\n"
        "context_shift       false                         default\n"
        "prompt_lookup       (unset)                       default\n"
        f"history             false                         {config}\n"
        "Error: usage: /show [info|parameters|system|template]; 'nonsense' is not one of them\n"
    )


def test_info_rows_for_a_local_model() -> None:
    info = BackendInfo("vivo-ai/BlueLM-7B-Chat", "cuda:0", "bfloat16", 2048, "4bit",
                       "BlueLMForCausalLM, 32 layers, hidden size 4096, 32 attention heads", 7_292_000_000, "/hf/snapshots/abc")
    assert info_rows(info) == [
        ("model", "vivo-ai/BlueLM-7B-Chat"),
        ("architecture", "BlueLMForCausalLM, 32 layers, hidden size 4096, 32 attention heads"),
        ("parameters", "7.29B (7,292,000,000)"),
        ("context", "2,048 tokens"),
        ("dtype", "bfloat16"),
        ("device", "cuda:0"),
        ("quantization", "4bit"),
        ("from", "/hf/snapshots/abc"),
    ]


def test_show_system_when_there_is_none(paths: UserPaths) -> None:
    repl, screen = repl_for(Chat(FakeBackend(), new_session(paths)), paths)
    repl.handle("/show system")
    assert screen.getvalue() == "No system prompt; /set system TEXT sets one.\n"

