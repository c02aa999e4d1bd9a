"""A hostile user's campaign against the local half of bluelm (issue 20): export, names, sanitiser, /file.

Every case runs the real CLI in a subprocess, with BLUELM_HOME in a temporary folder and a tiny checkpoint,
and is judged clean when bluelm did the right thing: one `Error:` line and a non-zero status where it must
refuse, no traceback, nothing raw (ESC, C1, bidi overrides) on the terminal, nothing of the user's touched,
no hang (each run has a deadline), and no turn lost (a message sent with --session is in its journal).

    python scripts/fault_campaign.py            # prints each case and "N tried, M clean, K turns lost"
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path

HOSTILE = "evil\x1b]2;PWNED\x07\x1b[2J\u202eexe.txt\u2066x\u2069\x9b31m"
RAW = ("\x1b]", "\x1b[2J", "\u202e", "\u2066", "\u2069", "\x9b")
DEADLINE_S = 120


class Case:
    def __init__(self, root: Path, checkpoint: Path) -> None:
        self.root, self.checkpoint = root, checkpoint
        self.home = root / "home"
        self.turn_lost = False

    def run(self, *args: str, stdin: str = "", cwd: Path | None = None, umask: int | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "BLUELM_HOME": str(self.home), "HF_HUB_OFFLINE": "1", "TERM": "xterm"}
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])

        def child() -> None:
            if umask is not None:
                os.umask(umask)

        return subprocess.run([sys.executable, "-m", "bluelm_cli", *args], env=env, input=stdin, text=True,
                              capture_output=True, timeout=DEADLINE_S, cwd=cwd, preexec_fn=child)

    def turns(self, name: str) -> list[str]:
        path = self.home / "sessions" / f"{name}.jsonl"
        if not path.is_file():
            return []
        users: list[str] = []
        pending = False  # the last entry is a message not answered yet (a turn then replaces it)
        for record in map(json.loads, path.read_text("utf-8").splitlines()):
            if record["type"] == "message":
                users.append(record["user"])
                pending = True
            elif record["type"] == "turn":
                if pending and users and users[-1] == record["user"]:
                    users.pop()
                users.append(record["user"])
                pending = False
        return users


def one_error(result: subprocess.CompletedProcess, status: int = 1) -> bool:
    # Only what bluelm says counts: torchao/torch print import-time notes of their own on some installs.
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    return (result.returncode == status and len(lines) == 1
            and "Traceback" not in result.stderr and not any(raw in result.stderr for raw in RAW))


def digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file())).hexdigest()


CASES: list[tuple[str, Callable[[Case], bool]]] = []


def case(name: str) -> Callable[[Callable[[Case], bool]], Callable[[Case], bool]]:
    def register(function: Callable[[Case], bool]) -> Callable[[Case], bool]:
        CASES.append((name, function))
        return function
    return register


# ------------------------------------------------------------------------------------------------ export
@case("export: an existing OUT.partial of the user's is untouched")
def _(c: Case) -> bool:
    mine = c.root / "out.partial"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    result = c.run("export", str(c.root / "out"), "-m", str(c.checkpoint))
    return result.returncode == 0 and (mine / "thesis.tex").read_text() == "years of work"


@case("export --model SRC.partial SRC keeps the source")
def _(c: Case) -> bool:
    import shutil

    source = c.root / "m.partial"
    shutil.copytree(c.checkpoint, source)
    before = digest(source)
    result = c.run("export", str(c.root / "m"), "-m", str(source))
    return result.returncode == 0 and digest(source) == before


for _format in ("hf", "gguf"):
    @case(f"export {_format}: SIGTERM right after start leaves no temporary and no OUT")
    def _(c: Case, export_format: str = _format) -> bool:
        env = {**os.environ, "BLUELM_HOME": str(c.home), "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        out = c.root / ("o" if export_format == "hf" else "o.gguf")
        process = subprocess.Popen([sys.executable, "-m", "bluelm_cli", "export", str(out), "-m", str(c.checkpoint),
                                    "--format", export_format], env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        # Wait for the staging folder to appear (the export is under way), then end it.
        for _ in range(DEADLINE_S * 100):
            if any(p.name.startswith(".o") for p in c.root.iterdir()) or process.poll() is not None:
                break
            time.sleep(0.01)  # a script polling the folder, not a test
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=DEADLINE_S)
        leftovers = [p.name for p in c.root.iterdir() if p.name not in ("home",)]
        return leftovers in ([], [out.name])  # either it had finished, or nothing is left


@case("export OUT=. is refused before the work")
def _(c: Case) -> bool:
    empty = c.root / "here"
    empty.mkdir()
    return one_error(c.run("export", ".", "-m", str(c.checkpoint), cwd=empty)) and not list(empty.iterdir())


@case("export OUT a symlink is refused")
def _(c: Case) -> bool:
    (c.root / "target").mkdir()
    (c.root / "link").symlink_to(c.root / "target")
    return one_error(c.run("export", str(c.root / "link"), "-m", str(c.checkpoint))) and not list((c.root / "target").iterdir())


@case("export into an unwritable folder (/sys) is refused")
def _(c: Case) -> bool:
    return one_error(c.run("export", "/sys/bluelm-out", "-m", str(c.checkpoint)))


@case("export OUT an existing file (hf) and an existing file (gguf) are refused")
def _(c: Case) -> bool:
    (c.root / "f").write_text("mine")
    return (one_error(c.run("export", str(c.root / "f"), "-m", str(c.checkpoint)))
            and one_error(c.run("export", str(c.root / "f"), "-m", str(c.checkpoint), "--format", "gguf"))
            and (c.root / "f").read_text() == "mine")


@case("exported weights follow the umask (0644)")
def _(c: Case) -> bool:
    result = c.run("export", str(c.root / "o"), "-m", str(c.checkpoint), umask=0o022)
    return result.returncode == 0 and {oct(p.stat().st_mode & 0o777) for p in (c.root / "o").iterdir()} == {"0o644"}


@case("export to a hostile OUT name prints it sanitised")
def _(c: Case) -> bool:
    result = c.run("export", str(c.root / HOSTILE), "-m", str(c.checkpoint))
    return result.returncode == 0 and not any(raw in result.stdout + result.stderr for raw in RAW)


# --------------------------------------------------------------------------------------------- sanitiser
@case("sessions list/search: hostile journal name, file name and model id are sanitised")
def _(c: Case) -> bool:
    sessions = c.home / "sessions"
    sessions.mkdir(parents=True)
    start = {"type": "start", "version": 1, "name": HOSTILE, "model_id": HOSTILE, "system": None, "sampling": {},
             "created_at": "2026-12-06T00:00:00Z"}
    turn = {"type": "turn", "user": "hi", "answer": "yo", "answer_ids": [], "finish_reason": "stop"}
    (sessions / f"{HOSTILE}.jsonl").write_text(json.dumps(start) + "\n" + json.dumps(turn) + "\n")
    outputs = [c.run("sessions"), c.run("sessions", "search", "hi"), c.run("sessions", "show", HOSTILE)]
    return all(not any(raw in r.stdout + r.stderr for raw in RAW) for r in outputs) and outputs[0].returncode == 0


@case("ask --model HOSTILE-path: the error names it sanitised")
def _(c: Case) -> bool:
    return one_error(c.run("ask", "--model", str(c.root / HOSTILE), "hi"))


@case("ask -f HOSTILE-path (missing): sanitised error")
def _(c: Case) -> bool:
    return one_error(c.run("ask", "--model", str(c.checkpoint), "-f", str(c.root / HOSTILE), "hi"))


@case("chat script mode: /file HOSTILE-path is a sanitised error, the chat goes on")
def _(c: Case) -> bool:
    result = c.run("chat", "--model", str(c.checkpoint), "-n", "2", "--session", "s", stdin=f"/file {c.root / HOSTILE}\nhi\n")
    return not any(raw in result.stdout + result.stderr for raw in RAW) and c.turns("s") == ["hi"]


# -------------------------------------------------------------------------------------------------- names
@case("--session with 90 CJK characters (270 bytes): one clear error")
def _(c: Case) -> bool:
    return one_error(c.run("ask", "--model", str(c.checkpoint), "-n", "2", "--session", "中" * 90, "hi"), status=2)


@case("--session with 83 CJK characters (249 bytes) works")
def _(c: Case) -> bool:
    result = c.run("ask", "--model", str(c.checkpoint), "-n", "2", "--session", "中" * 83, "hi")
    c.turn_lost = result.returncode == 0 and c.turns("中" * 83) != ["hi"]
    return result.returncode == 0 and not c.turn_lost


@case("--session=-x works and chat --resume=-x continues it")
def _(c: Case) -> bool:
    first = c.run("ask", "--model", str(c.checkpoint), "-n", "2", "--session=-x", "one")
    second = c.run("chat", "--model", str(c.checkpoint), "-n", "2", "--resume=-x", stdin="two\n")
    c.turn_lost = c.turns("-x") != ["one", "two"]
    return first.returncode == second.returncode == 0 and not c.turn_lost


@case("--resume -x (no =) names the session -x: one clear error when there is none, not a traceback")
def _(c: Case) -> bool:
    result = c.run("chat", "--model", str(c.checkpoint), "--resume", "-x", stdin="")
    return one_error(result, status=1) and "no session named '-x'" in result.stderr


@case("NFD and NFC spellings are one session")
def _(c: Case) -> bool:
    nfd, nfc = unicodedata.normalize("NFD", "café"), unicodedata.normalize("NFC", "café")
    results = [c.run("ask", "--model", str(c.checkpoint), "-n", "2", "--session", name, q) for name, q in ((nfd, "a"), (nfc, "b"))]
    c.turn_lost = c.turns(nfc) != ["a", "b"]
    return all(r.returncode == 0 for r in results) and [p.name for p in (c.home / "sessions").iterdir()] == [f"{nfc}.jsonl"]


for _bad in ("../escape", ".hidden", "a/b", "x" * 101, "tab\there"):
    @case(f"--session {_bad!r} is refused with one line")
    def _(c: Case, bad: str = _bad) -> bool:
        return one_error(c.run("ask", "--model", str(c.checkpoint), "--session", bad, "hi"), status=2) and not (c.root / "escape.jsonl").exists()


@case("two ask --session NEW at the same moment: one session with both turns, or one clear refusal")
def _(c: Case) -> bool:
    env = {**os.environ, "BLUELM_HOME": str(c.home), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    processes = [subprocess.Popen([sys.executable, "-m", "bluelm_cli", "ask", "--model", str(c.checkpoint), "-n", "2",
                                   "--session", "NEW", q], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for q in ("one", "two")]
    outcomes = [(p.wait(timeout=DEADLINE_S), p.communicate()[1]) for p in processes]
    turns = c.turns("NEW")
    refused = [err for status, err in outcomes if status != 0]
    c.turn_lost = len(turns) + len(refused) != 2
    return (sorted(turns) == ["one", "two"] and not refused) or (len(turns) == 1 and len(refused) == 1
                                                                and "is open in another bluelm" in refused[0])


# ---------------------------------------------------------------------------------------- /file, ask -f
@case("ask -f FIFO nothing writes to: refused, no hang")
def _(c: Case) -> bool:
    os.mkfifo(c.root / "fifo")
    return one_error(c.run("ask", "--model", str(c.checkpoint), "-f", str(c.root / "fifo"), "hi"))


for _device in ("/dev/null", "/dev/zero", "/dev/tty"):
    @case(f"ask -f {_device}: refused as a device")
    def _(c: Case, device: str = _device) -> bool:
        return one_error(c.run("ask", "--model", str(c.checkpoint), "-f", device, "hi"))


@case("ask -f a socket: refused")
def _(c: Case) -> bool:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(c.root / "sock"))
    try:
        return one_error(c.run("ask", "--model", str(c.checkpoint), "-f", str(c.root / "sock"), "hi"))
    finally:
        server.close()


@case("chat /file FIFO: refused, the next message is answered and journaled")
def _(c: Case) -> bool:
    os.mkfifo(c.root / "fifo")
    result = c.run("chat", "--model", str(c.checkpoint), "-n", "2", "--session", "f", stdin=f"/file {c.root / 'fifo'}\nafter\n")
    c.turn_lost = c.turns("f") != ["after"]
    return "named pipe" in result.stderr and not c.turn_lost


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint

    with tempfile.TemporaryDirectory(prefix="bluelm-campaign-") as shared:
        checkpoint = build_checkpoint(Path(shared) / "ckpt", TinySpec())
        clean = lost = 0
        for name, check in CASES:
            with tempfile.TemporaryDirectory(prefix="case-") as root:
                c = Case(Path(root), checkpoint)
                try:
                    ok = check(c)
                except subprocess.TimeoutExpired:
                    ok = False
                    name += " (HUNG)"
                except Exception as error:  # noqa: BLE001 - a case that breaks is reported, not fatal
                    ok = False
                    name += f" ({type(error).__name__}: {error})"
                clean += ok
                lost += c.turn_lost
                print(f"{'clean' if ok else 'NOT CLEAN'}{' TURN LOST' if c.turn_lost else ''}: {name}", flush=True)
        print(f"{len(CASES)} tried, {clean} clean, {lost} turns lost")
        return 0 if clean == len(CASES) and not lost else 1


if __name__ == "__main__":
    sys.exit(main())
