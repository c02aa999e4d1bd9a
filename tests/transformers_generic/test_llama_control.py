"""Control: the same generic suite against transformers' own Llama, in the same run.

Llama passes every generic test on a transformers tree that matches the installed release, so a test that
fails here as well as for BlueLM points at the test tree (a mismatch with the installed transformers), not at
BlueLM.
"""

from __future__ import annotations

import importlib
import unittest

import pytest

from tests.transformers_generic.conftest import PACKAGE_NAME, transformers_tests_dir, tree_mismatch

if transformers_tests_dir() is None:
    pytest.skip(
        "set TRANSFORMERS_TESTS_DIR to a transformers tests/ tree (scripts/run_transformers_generic_suite.sh)",
        allow_module_level=True,
    )

from transformers import LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

_causal_lm_tester = importlib.import_module(f"{PACKAGE_NAME}.causal_lm_tester")


class LlamaControlModelTester(_causal_lm_tester.CausalLMModelTester):
    base_model_class = LlamaModel


class LlamaControlModelTest(_causal_lm_tester.CausalLMModelTest, unittest.TestCase):
    # As in transformers' tests/models/llama/test_modeling_llama.py.
    model_tester_class = LlamaControlModelTester
    model_split_percents = [0.5, 0.7, 0.8]
    _torch_compile_train_cls = LlamaForCausalLM
    rotary_embedding_layer = LlamaRotaryEmbedding  # as the BlueLM harness (older trees gate RoPE tests on it)

    def setUp(self) -> None:
        super().setUp()
        mismatch = tree_mismatch(self._testMethodName, getattr(type(self), self._testMethodName))
        if mismatch is not None:
            self.skipTest(mismatch)
