"""Shared test setup: no test ever touches the real home directory or the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every user directory bluelm-cli or huggingface_hub could use at a fresh temporary folder."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("BLUELM_HOME", str(home / "bluelm"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(home / "modelscope"))
    monkeypatch.delenv("BLUELM_MODEL", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "unknown")
    # The tests' servers are on 127.0.0.1: a proxy set in the caller's environment must not be asked for them.
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    for name in ("BLUELM_API_KEY", "OPENAI_API_KEY", "BLUELM_API"):
        monkeypatch.delenv(name, raising=False)
    return home
