"""transformers' generic causal-LM suite (ModelTesterMixin + GenerationTesterMixin + PipelineTesterMixin)
run against BlueLM, modelled on transformers' tests/models/llama/test_modeling_llama.py.

Run through `scripts/run_transformers_generic_suite.sh`; skipped when no transformers test tree is given.
"""

from __future__ import annotations

import unittest

import pytest

from tests.transformers_generic.conftest import PACKAGE_NAME, transformers_tests_dir, tree_mismatch

if transformers_tests_dir() is None:
    pytest.skip(
        "set TRANSFORMERS_TESTS_DIR to a transformers tests/ tree (scripts/run_transformers_generic_suite.sh)",
        allow_module_level=True,
    )

import importlib
from unittest import mock

from transformers.models.auto import modeling_auto

from bluelm_cli.modeling import BlueLMConfig, BlueLMForCausalLM, BlueLMModel
from bluelm_cli.modeling.modeling_bluelm import BlueLMRotaryEmbedding

_causal_lm_tester = importlib.import_module(f"{PACKAGE_NAME}.causal_lm_tester")
CausalLMModelTest = _causal_lm_tester.CausalLMModelTest
CausalLMModelTester = _causal_lm_tester.CausalLMModelTester


class BlueLMModelTester(CausalLMModelTester):
    base_model_class = BlueLMModel
    # Our names follow transformers' convention except the config's module, so name them explicitly.
    config_class = BlueLMConfig
    causal_lm_class = BlueLMForCausalLM


class BlueLMModelTest(CausalLMModelTest, unittest.TestCase):
    model_tester_class = BlueLMModelTester
    # Same split as transformers' Llama test (used by the offload / parallelism tests).
    model_split_percents = [0.5, 0.7, 0.8]
    _torch_compile_train_cls = BlueLMForCausalLM
    # Older test trees run their RoPE tests only when this is set; newer ones find the class in the model.
    rotary_embedding_layer = BlueLMRotaryEmbedding

    def setUp(self) -> None:
        super().setUp()
        # Several generic tests pick the classes they check by name from transformers' built-in name tables
        # (MODEL_MAPPING_NAMES for "the base model", MODEL_FOR_CAUSAL_LM_MAPPING_NAMES for "a causal-LM head"),
        # which only in-library models are in; `AutoModel.register` does not add to them. Without this, those
        # tests silently skip BlueLM (test_causal_lm_loss_honors_shift_labels, test_model_rope_with_partial_rotation)
        # or train the base model as if it were a head (test_training). Listing BlueLM there for the duration of
        # each test makes them check BlueLM exactly as they check a built-in model of the same kind.
        for table, class_name in (
            (modeling_auto.MODEL_MAPPING_NAMES, BlueLMModel.__name__),
            (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, BlueLMForCausalLM.__name__),
        ):
            patcher = mock.patch.dict(table, {BlueLMConfig.model_type: class_name})
            patcher.start()
            self.addCleanup(patcher.stop)
        test_name = self._testMethodName
        mismatch = tree_mismatch(test_name, getattr(type(self), test_name))
        if mismatch is not None:
            self.skipTest(mismatch)
