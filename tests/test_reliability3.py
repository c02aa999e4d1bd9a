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
    result = runner.invoke(app, ["export", str(out), "-m", str(source), "-f", export_format])
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
