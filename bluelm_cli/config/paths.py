"""Where bluelm-cli keeps the user's files.

With ``BLUELM_HOME`` set, everything lives under it::

    $BLUELM_HOME/config.toml        settings (see bluelm_cli.config.settings)
    $BLUELM_HOME/data/history       prompt history of the REPL
    $BLUELM_HOME/sessions/          one journal per session (<name>.jsonl)

Otherwise the platform's conventions apply (platformdirs):
``user_config_dir("bluelm")/config.toml``, ``user_data_dir("bluelm")/history`` and
``user_data_dir("bluelm")/sessions``.

Nothing here creates a directory; callers use :func:`ensure_dir` when they first write.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bluelm_cli.core.errors import BlueLMError

APP_NAME = "bluelm"
HOME_ENV = "BLUELM_HOME"


@dataclass(frozen=True)
class UserPaths:
    config_file: Path
    data_dir: Path
    sessions_dir: Path
    history_file: Path


def user_paths(env: Mapping[str, str] = os.environ) -> UserPaths:
    """The user's directories, honouring ``BLUELM_HOME``. Creates nothing."""
    home = env.get(HOME_ENV, "").strip()
    if home:
        root = Path(home).expanduser()
        data_dir = root / "data"
        return UserPaths(
            config_file=root / "config.toml",
            data_dir=data_dir,
            sessions_dir=root / "sessions",
            history_file=data_dir / "history",
        )
    import platformdirs  # imported lazily: only needed without BLUELM_HOME

    config_dir = Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))
    data_dir = Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))
    return UserPaths(
        config_file=config_dir / "config.toml",
        data_dir=data_dir,
        sessions_dir=data_dir / "sessions",
        history_file=data_dir / "history",
    )


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0o700 if missing; return it.

    Raises BlueLMError when it cannot be created (e.g. a parent is a regular file).
    """
    path = Path(path)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise BlueLMError(f"cannot create directory {path}: a file with that name exists; move it away") from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise BlueLMError(f"cannot create directory {path}: {reason}; check the path and its permissions") from None
    if not path.is_dir():
        raise BlueLMError(f"cannot create directory {path}: a file with that name exists; move it away")
    return path


def expand_user(path: str | Path) -> Path:
    """``~/x`` and ``~user/x`` expanded; an unknown user is a BlueLMError, not a RuntimeError."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        user = str(path).split("/", 1)[0]
        raise BlueLMError(f"{path}: there is no user {user.lstrip('~')!r} whose home {user} could mean") from None
