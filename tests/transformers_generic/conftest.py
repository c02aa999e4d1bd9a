"""Makes transformers' own test sources importable for the generic-suite harness, or skips it.

The harness needs `tests/` of a transformers source tree matching the installed release (the sdist lacks
tests/generation and tests/causal_lm_tester.py). `scripts/run_transformers_generic_suite.sh` provides one and
points TRANSFORMERS_TESTS_DIR at it; without it (the default CI run) the harness module is skipped.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from pathlib import Path

from transformers.cache_utils import StaticCache
from transformers.generation.configuration_utils import ALL_CACHE_IMPLEMENTATIONS

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


# Tests a test tree newer than the installed transformers cannot run here, each with what it needs that the
# installed release lacks. transformers' own Llama fails them the same way (test_llama_control.py), so they say
# nothing about BlueLM; each is skipped only while the tree really uses that name and the library lacks it.
_TREE_MISMATCHES = {
    "test_assisted_decoding_matches_greedy_search": (
        '"dynamic_full"', lambda: "dynamic_full" not in ALL_CACHE_IMPLEMENTATIONS,
        "the test tree uses cache_implementation='dynamic_full', which this transformers does not have",
    ),
    "test_assisted_decoding_sample": (
        '"dynamic_full"', lambda: "dynamic_full" not in ALL_CACHE_IMPLEMENTATIONS,
        "the test tree uses cache_implementation='dynamic_full', which this transformers does not have",
    ),
    "test_generate_compilation_all_outputs": (
        ".get_max_cache_shape()", lambda: not hasattr(StaticCache, "get_max_cache_shape"),
        "the test tree calls StaticCache.get_max_cache_shape(), which this transformers does not have",
    ),
}


def tree_mismatch(test_name: str, test: object) -> str | None:
    for prefix, (used_name, library_lacks_it, reason) in _TREE_MISMATCHES.items():
        # The module, not the method: the call can sit in a helper, and parameterized tests are wrappers.
        if test_name.startswith(prefix) and used_name in inspect.getsource(inspect.getmodule(test)):
            return reason if library_lacks_it() else None
    return None


_directory = transformers_tests_dir()
if _directory is not None:
    _import_as_package(_directory)
