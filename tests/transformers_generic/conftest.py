"""Makes transformers' own test sources importable for the generic-suite harness, or skips it.

The harness needs `tests/` of a transformers source tree matching the installed release (the sdist lacks
tests/generation and tests/causal_lm_tester.py). `scripts/run_transformers_generic_suite.sh` provides one and
points TRANSFORMERS_TESTS_DIR at it; without it (the default CI run) the harness module is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

# transformers' tests are a package named `tests`, the same name as ours; load them under a name of their own
# so their relative imports (`from .test_modeling_common import ...`) resolve inside their tree.
PACKAGE_NAME = "transformers_tests"


def transformers_tests_dir() -> Path | None:
    configured = os.environ.get("TRANSFORMERS_TESTS_DIR")
    if not configured:
        return None
    directory = Path(configured)
    return directory if (directory / "causal_lm_tester.py").is_file() else None


def _import_as_package(directory: Path) -> None:
    if PACKAGE_NAME in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        PACKAGE_NAME, directory / "__init__.py", submodule_search_locations=[str(directory)]
    )
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE_NAME] = package
    spec.loader.exec_module(package)


_directory = transformers_tests_dir()
if _directory is not None:
    _import_as_package(_directory)
