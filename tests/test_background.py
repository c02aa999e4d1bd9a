"""The background-loading backend and the chat around it, on a fake model whose load the test releases
(an Event, never a sleep): what works before the model is there, what waits for it, and how it ends."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from bluelm_cli.chat.background import BackgroundBackend, LoadEvent, LoadFailed, LoadProgress
from bluelm_cli.core.backend import ModelLoading
from bluelm_cli.chat.service import Chat
from bluelm_cli.core.errors import BlueLMError
from bluelm_cli.ui.output import ChatOutput
from bluelm_cli.config.paths import UserPaths, user_paths
from bluelm_cli.core.prompt import PromptPlan
from bluelm_cli.ui.repl import ChatRepl, run_chat
from bluelm_cli.session import Session
from bluelm_cli.core.settings import SamplingSettings
from bluelm_cli.testing.fakes import FakeBackend


class GatedLoad:
    """A load that reports a step and a warning, then waits for `release` (or fails with `error`)."""

    def __init__(self, model: FakeBackend, error: BaseException | None = None, *, warn: bool = True) -> None:
        self.model = model
        self.error = error
        self.warn = warn
        self.release = threading.Event()
        self.waiting = threading.Event()  # set once the load is parked on `release`

    def __call__(self, progress: LoadProgress) -> FakeBackend:
        progress.status("Reading weights")
        if self.warn:
            progress.warn("no CUDA GPU found")
        self.waiting.set()
        self.release.wait()
        if self.error is not None:
            raise self.error
        progress.note("Loaded fake/BlueLM in 0.1 s")
        return self.model


class ReleasedWhenWaitedOn(BackgroundBackend):
    """Releases its gated load only once the chat blocks waiting for it: proof that the chat waited."""

    def __init__(self, load: GatedLoad) -> None:
        super().__init__(load, status="Loading fake/BlueLM")
        self.gated = load
        self.waits = 0

    def take_events(self, *, block: bool = False) -> list[LoadEvent]:
        if block:
            self.waits += 1
            self.gated.release.set()
        return super().take_events(block=block)


@pytest.fixture
def paths() -> UserPaths:
    return user_paths()


def new_session(paths: UserPaths) -> Session:
    return Session.new(paths.sessions_dir, name="t", model_id="fake/BlueLM")


def settled(backend: BackgroundBackend) -> list[LoadEvent]:
    """Every event until the load has ended."""
    events: list[LoadEvent] = []
    while not events or events[-1].kind not in ("loaded", "failed"):
        events += backend.take_events(block=True)
    return events


# ------------------------------------------------------------------------------------------ the backend
def test_before_the_load_ends_the_model_parts_raise_model_loading_then_delegate() -> None:
    model = FakeBackend().queue("Hi.")
    load = GatedLoad(model)
    backend = BackgroundBackend(load, status="Loading fake/BlueLM")
    assert backend.status_text == "Loading fake/BlueLM" and backend.loading and not backend.ready
    backend.start()
    assert load.waiting.wait(30)
    assert backend.status_text == "Reading weights"
    for need_model in (lambda: backend.encoder, lambda: backend.context_limit, backend.info,
                       lambda: backend.stream(PromptPlan(ids=[1]), SamplingSettings())):
        with pytest.raises(ModelLoading, match="^the model is still loading$"):
            need_model()
    load.release.set()
    assert settled(backend) == [LoadEvent("warning", "no CUDA GPU found"), LoadEvent("note", "Loaded fake/BlueLM in 0.1 s"),
                                LoadEvent("loaded")]
    assert backend.ready and not backend.loading and backend.error is None
    assert backend.loaded is model and backend.encoder is model.encoder and backend.context_limit == 2048
    assert backend.info().model_id == "fake/BlueLM"
    assert backend.load_seconds is not None and backend.load_seconds >= 0
    backend.start()  # a second start does nothing
    assert backend.take_events() == []


def test_a_failed_load_is_one_line_with_the_load_errors_status() -> None:
    load = GatedLoad(FakeBackend(), error=BlueLMError("/m/model.safetensors is damaged; download the checkpoint again"))
    backend = BackgroundBackend(load)
    backend.start()
    load.release.set()
    events = settled(backend)
    assert events[-1] == LoadEvent("failed", "/m/model.safetensors is damaged; download the checkpoint again")
    assert isinstance(backend.error, LoadFailed) and backend.error.exit_status == 1
    assert isinstance(backend.error.__cause__, BlueLMError)
    assert not backend.loading and not backend.ready
    with pytest.raises(LoadFailed, match="^/m/model.safetensors is damaged"):
        backend.encoder


def test_an_unexpected_load_failure_names_its_type_and_points_at_debug() -> None:
    load = GatedLoad(FakeBackend(), error=RuntimeError("boom"))
    load.release.set()
    backend = BackgroundBackend(load)
    backend.start()
    assert settled(backend)[-1] == LoadEvent("failed", "RuntimeError: boom (run again with --debug for the traceback)")


def test_the_waker_is_called_from_the_loader_thread_for_every_event() -> None:
    load = GatedLoad(FakeBackend())
    load.release.set()
    backend = BackgroundBackend(load)
    woken: list[str] = []
    backend.set_waker(lambda: woken.append(threading.current_thread().name))
    backend.start()
    settled(backend)
    assert woken == ["bluelm-load"] * 3


def test_exit_now_if_loading_returns_when_the_loader_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)  # recorded instead of ending the test process
    load = GatedLoad(FakeBackend())
    backend = BackgroundBackend(load)
    backend.exit_now_if_loading(3)  # never started: nothing to wait out
    assert exits == []
    backend.start()
    backend.exit_now_if_loading(4)  # the loader is held at its gate: the process would end now
    assert exits == [4]
    load.release.set()
    settled(backend)
    backend._thread.join()  # type: ignore[union-attr]
    backend.exit_now_if_loading(5)  # done: returns
    assert exits == [4]


# --------------------------------------------------------------------------------- the chat, exact output
def test_commands_that_need_no_model_work_at_once_and_show_says_model_loading(paths: UserPaths, tmp_path: Path) -> None:
    load = GatedLoad(FakeBackend())
    backend = BackgroundBackend(load)
    chat = Chat(backend, new_session(paths))
    console = Console(file=io.StringIO(), width=200)
    repl = ChatRepl(chat, ChatOutput(console, interactive=True), paths=paths)
    repl.show_banner()
    for line in ("/set temperature 0.3", "/set max_new_tokens 64", "/show", f"/save {tmp_path / 'c.json'}",
                 "/reset", "/undo", "/load " + str(tmp_path / "c.json"), "/exit"):
        repl.handle(line)
    assert repl.exit_requested and not backend.ready
    assert console.file.getvalue() == (
        "BlueLM chat · fake/BlueLM · loading in the background\n"
        "Session t · /help for commands · Alt-Enter for a new line · Ctrl-D or /exit quits\n"
        "temperature = 0.3\n"
        "max_new_tokens = 64\n"
        "model               fake/BlueLM (model loading)\n"
        "session             t · 0 turns, 0 in the context\n"
        "context             (model loading)\n"
        "system              (unset)\n"
        "max_new_tokens      64\n"
        "temperature         0.3\n"
        "top_p               0.9\n"
        "top_k               0\n"
        "repetition_penalty  1.1\n"
        "seed                (unset)\n"
        "stats               off\n"
        f"Saved to {tmp_path / 'c.json'}\n"
        "New conversation; settings kept.\n"
        "Error: nothing to undo; the conversation is empty\n"
        f"Loaded 0 turns from {tmp_path / 'c.json'}\n"
    )


def test_a_message_sent_during_the_load_waits_for_the_model_and_is_answered(paths: UserPaths) -> None:
    model = FakeBackend().queue("Hello!")
    backend = ReleasedWhenWaitedOn(GatedLoad(model))
    chat = Chat(backend, new_session(paths))
    console = Console(file=io.StringIO(), width=200)
    repl = ChatRepl(chat, ChatOutput(console, interactive=True), paths=paths)
    ready: list[str] = []
    from bluelm_cli.ui.load_view import LoadView

    repl.loading = LoadView(backend, repl.out, on_loaded=lambda: repl.model_loaded(lambda: ready.append("ready")))
    repl.handle("hi")
    assert backend.waits >= 1 and ready == ["ready"]
    assert model.prompt_text() == "<s>[|Human|]:hi[|AI|]:"
    assert [(t.user, t.answer) for t in chat.session.turns] == [("hi", "Hello!")]
    assert console.file.getvalue() == "Warning: no CUDA GPU found\nLoaded fake/BlueLM in 0.1 s\nHello!\n\n"


def test_ctrl_c_while_a_message_waits_cancels_it_and_records_nothing(paths: UserPaths) -> None:
    class InterruptedWait(BackgroundBackend):
        def take_events(self, *, block: bool = False) -> list[LoadEvent]:
            if block:
                raise KeyboardInterrupt  # what SIGINT does to the blocked wait
            return super().take_events(block=block)

    model = FakeBackend().queue("Later.")
    load = GatedLoad(model)
    backend = InterruptedWait(load)
    chat = Chat(backend, new_session(paths))
    repl = ChatRepl(chat, ChatOutput(Console(file=io.StringIO(), width=200), interactive=True), paths=paths)
    from bluelm_cli.ui.load_view import LoadView

    repl.loading = LoadView(backend, repl.out, on_loaded=repl.model_loaded)
    with pytest.raises(KeyboardInterrupt):
        repl.handle("too early")
    assert chat.session.turns == [] and model.plans == [] and repl.failures == 0
    assert repl.out.console.file.getvalue().endswith("\nNot sent: Ctrl-C while it waited for the model (↑ brings the line back)\n")
    load.release.set()
    while not backend.ready:
        BackgroundBackend.take_events(backend, block=True)
    repl.handle("now")
    assert [(t.user, t.answer) for t in chat.session.turns] == [("now", "Later.")]


def test_a_load_error_while_a_message_waits_ends_the_chat(paths: UserPaths) -> None:
    backend = ReleasedWhenWaitedOn(GatedLoad(FakeBackend(), error=BlueLMError("config.json is not valid JSON")))
    chat = Chat(backend, new_session(paths))
    repl = ChatRepl(chat, ChatOutput(Console(file=io.StringIO(), width=200), interactive=True), paths=paths)
    from bluelm_cli.ui.load_view import LoadView

    repl.loading = LoadView(backend, repl.out, on_loaded=repl.model_loaded)
    with pytest.raises(LoadFailed, match="^config.json is not valid JSON$"):
        repl.handle("hi")
    assert chat.session.turns == [] and repl.failures == 0


def test_script_mode_waits_for_the_load_then_reads_lines(paths: UserPaths) -> None:
    model = FakeBackend().queue("Hi.")
    load = GatedLoad(model)
    load.release.set()
    chat = Chat(BackgroundBackend(load), new_session(paths))
    out, err = io.StringIO(), io.StringIO()
    status = run_chat(chat, console=Console(file=out, width=100), paths=paths, stdin=io.StringIO("hello\n/show\n"),
                      err_console=Console(file=err, width=100))
    assert status == 0
    assert err.getvalue() == "Warning: no CUDA GPU found\nLoaded fake/BlueLM in 0.1 s\n"
    assert out.getvalue().startswith("Hi.\nmodel               fake/BlueLM (cpu, float32)\n")


def test_resumed_answers_with_foreign_ids_are_checked_once_the_model_is_there(paths: UserPaths) -> None:
    session = new_session(paths)
    from bluelm_cli.session import Turn

    session.add_turn(Turn(user="q", answer="a", answer_ids=[-5]))
    model = FakeBackend().queue("ok")
    backend = ReleasedWhenWaitedOn(GatedLoad(model))
    chat = Chat(backend, session)
    assert session.warnings == [] and session.turns[0].answer_ids == [-5]  # not checked while loading
    console = Console(file=io.StringIO(), width=200)
    repl = ChatRepl(chat, ChatOutput(console, interactive=True), paths=paths)
    from bluelm_cli.ui.load_view import LoadView

    repl.loading = LoadView(backend, repl.out, on_loaded=repl.model_loaded)
    repl.handle("next")
    assert session.turns[0].answer_ids == []
    assert "Warning: turn 1 holds token id -5, which this model does not have; its answer is sent as text\n" in console.file.getvalue()
    assert model.prompt_text() == "<s>[|Human|]:q[|AI|]:a</s>[|Human|]:next[|AI|]:"


# ------------------------------------------------------------------------------ the prompt, real keys
def test_prompt_works_during_the_load_and_ctrl_c_on_an_empty_line_ends_the_chat(paths: UserPaths) -> None:
    load = GatedLoad(FakeBackend(), warn=False)  # (a warning would print whenever the loader got to it)
    backend = BackgroundBackend(load)
    chat = Chat(backend, new_session(paths))
    console = Console(file=io.StringIO(), width=200, highlight=False)
    handled = threading.Event()
    handle = ChatRepl.handle

    def handle_and_tell(self: ChatRepl, text: str) -> None:
        try:
            handle(self, text)
        finally:
            handled.set()

    try:
        ChatRepl.handle = handle_and_tell  # type: ignore[method-assign]
        with create_pipe_input() as pipe:

            def feed() -> None:
                # One line, then (once it is handled: keys that arrive together are one pasted burst) a draft
                # that the first Ctrl-C clears; the second Ctrl-C, on an empty line, quits.
                pipe.send_text("/set top_k 5\r")
                if handled.wait(30):
                    pipe.send_text("draft\x03\x03")

            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
            status = run_chat(chat, console=console, paths=paths, pt_input=pipe, pt_output=DummyOutput())
            feeder.join()
        assert status == 130
        assert backend.loading
        assert chat.sampling.top_k == 5
        assert console.file.getvalue() == (
            "BlueLM chat · fake/BlueLM · loading in the background\n"
            "Session t · /help for commands · Alt-Enter for a new line · Ctrl-D or /exit quits\n"
            "top_k = 5\n"
        )
    finally:
        ChatRepl.handle = handle  # type: ignore[method-assign]
        load.release.set()


def test_keys_typed_while_a_message_waits_for_the_model_are_not_echoed_into_the_status_line(
    paths: UserPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The terminal's echo would write them into the "Waiting for the model" line; they wait, unread, for the
    next prompt instead (which shows them), and echo is back on after the wait."""
    import pty
    import termios

    controller, terminal = pty.openpty()
    echo_during_wait: list[bool] = []

    class Observed(ReleasedWhenWaitedOn):
        def take_events(self, *, block: bool = False) -> list[LoadEvent]:
            if block:
                echo_during_wait.append(bool(termios.tcgetattr(terminal)[3] & termios.ECHO))
            return super().take_events(block=block)

    with os.fdopen(terminal, "r", closefd=False) as stdin:
        monkeypatch.setattr("sys.stdin", stdin)
        backend = Observed(GatedLoad(FakeBackend().queue("Hello!")))
        chat = Chat(backend, new_session(paths))
        repl = ChatRepl(chat, ChatOutput(Console(file=io.StringIO(), width=200), interactive=True), paths=paths)
        from bluelm_cli.ui.load_view import LoadView

        repl.loading = LoadView(backend, repl.out, on_loaded=repl.model_loaded)
        assert termios.tcgetattr(terminal)[3] & termios.ECHO  # a fresh pty echoes
        repl.handle("hi")
        echo_after = bool(termios.tcgetattr(terminal)[3] & termios.ECHO)
    os.close(controller)
    os.close(terminal)
    assert echo_during_wait and not any(echo_during_wait) and echo_after
    assert [(t.user, t.answer) for t in chat.session.turns] == [("hi", "Hello!")]
