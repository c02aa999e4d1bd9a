#!/usr/bin/env bash
# Runs transformers' own generic causal-LM suite (ModelTesterMixin, GenerationTesterMixin, PipelineTesterMixin,
# through tests/causal_lm_tester.py) against BlueLM: tests/transformers_generic/test_bluelm_generic.py.
#
# It needs a transformers source tree (tests/, utils/test_module, src/) of the release installed in the active
# environment; the PyPI sdist is not enough (it ships tests/test_modeling_common.py but not tests/generation/ or
# tests/causal_lm_tester.py). Give one with TRANSFORMERS_SRC=/path/to/transformers, or let this script clone the
# matching tag into .transformers-src/ (needs access to github.com).
#
# Usage: . .venv/bin/activate && scripts/run_transformers_generic_suite.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(python -c 'import transformers; print(transformers.__version__)')
source_tree=${TRANSFORMERS_SRC:-.transformers-src/v$version}
if [[ ! -f "$source_tree/tests/causal_lm_tester.py" ]]; then
    if [[ -n "${TRANSFORMERS_SRC:-}" ]]; then
        echo "Error: TRANSFORMERS_SRC=$TRANSFORMERS_SRC has no tests/causal_lm_tester.py; point it at a transformers $version checkout" >&2
        exit 2
    fi
    mkdir -p .transformers-src
    if ! git clone --quiet --depth 1 --branch "v$version" https://github.com/huggingface/transformers "$source_tree"; then
        echo "Error: could not clone transformers v$version; set TRANSFORMERS_SRC to a transformers $version checkout" >&2
        exit 2
    fi
fi

# What transformers' test modules import beyond the project's test extra.
pip install --quiet parameterized httpx

TRANSFORMERS_TESTS_DIR=$(cd "$source_tree/tests" && pwd) \
    exec python -m pytest tests/transformers_generic -p no:cacheprovider -p no:warnings -rfEs "$@"
