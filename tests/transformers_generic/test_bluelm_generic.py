"""transformers' generic causal-LM suite (ModelTesterMixin + GenerationTesterMixin + PipelineTesterMixin)
run against BlueLM, modelled on transformers' tests/models/llama/test_modeling_llama.py.

Run through `scripts/run_transformers_generic_suite.sh`; skipped when no transformers test tree is given.
"""

from __future__ import annotations

import unittest

import pytest

from tests.transformers_generic.conftest import PACKAGE_NAME, transformers_tests_dir

if transformers_tests_dir() is None:
    pytest.skip(
        "set TRANSFORMERS_TESTS_DIR to a transformers tests/ tree (scripts/run_transformers_generic_suite.sh)",
        allow_module_level=True,
    )

import importlib

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
    rotary_embedding_layer = BlueLMRotaryEmbedding
    _torch_compile_train_cls = BlueLMForCausalLM
