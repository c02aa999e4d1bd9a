"""`--quantize int8|int4` through torchao: int8 on the CPU agrees with the unquantized model within a stated
tolerance; int4 and a missing torchao are refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bluelm_cli.core.errors import BlueLMError
from bluelm_cli.core.prompt import PromptPlan
from bluelm_cli.core.settings import SamplingSettings
from bluelm_cli.local.engine import ChatEngine
from bluelm_cli.local.loading import LoadedModel, load_model
from bluelm_cli.modeling.modeling_bluelm import fuse_projections
from bluelm_cli.testing.tiny_checkpoint import TinySpec, build_checkpoint

pytest.importorskip("torchao")
from bluelm_cli.local.quantize import quantize_weights  # noqa: E402

# The tolerance int8 weight-only is held to on the tiny checkpoint (float32, CPU), over 100 positions: the largest
# logit difference at most a tenth of the logits' spread, mean KL(bf16 ‖ int8) of the next-token distributions
# under 1e-3 nats, and the greedy next token the same at 95% of the positions or more.
MAX_LOGIT_ERROR_OVER_STD = 0.1
MAX_MEAN_KL = 1e-3
MIN_ARGMAX_AGREEMENT = 0.95


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(Path(tmp_path_factory.mktemp("quant")), TinySpec())


def _loaded(folder: Path) -> LoadedModel:
    return load_model(str(folder), device="cpu", dtype="float32")


def test_int8_weight_only_agrees_with_the_unquantized_model(folder: Path) -> None:
    reference, quantized = _loaded(folder), _loaded(folder)
    fuse_projections(quantized.model)  # as the CLI does: fused first, then quantized
    assert quantize_weights(quantized.model, "int8") == "torchao int8 weight-only"
    assert "Int8" in type(quantized.model.model.layers[0].self_attn.qkv_proj.weight).__name__
    ids = torch.tensor([[1, *range(20, 120)]])
    pieces = reference.tokenizer.sp_model.get_piece_size()
    with torch.inference_mode():
        expected = reference.model(input_ids=ids).logits[..., :pieces]
        got = quantized.model(input_ids=ids).logits[..., :pieces]
    assert not torch.equal(got, expected)  # the weights really changed
    assert (got - expected).abs().max() <= MAX_LOGIT_ERROR_OVER_STD * expected.std()
    p, q = torch.log_softmax(expected, -1), torch.log_softmax(got, -1)
    assert (p.exp() * (p - q)).sum(-1).mean() <= MAX_MEAN_KL
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= MIN_ARGMAX_AGREEMENT
    # And the engine answers with it (eager path on the CPU).
    settings = SamplingSettings(max_new_tokens=16, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
    result = ChatEngine(quantized).stream(PromptPlan([1, *range(30, 50)]), settings, min_new_tokens=16).finish()
    assert result.new_tokens == 16


def test_int4_on_the_cpu_and_unknown_schemes_are_refused(folder: Path) -> None:
    loaded = _loaded(folder)
    with pytest.raises(BlueLMError, match=r"^--quantize int4 needs a CUDA GPU \(torchao's int4 kernels\); on the CPU use --quantize int8$"):
        quantize_weights(loaded.model, "int4")
    with pytest.raises(BlueLMError, match="unknown quantization 'int3'"):
        quantize_weights(loaded.model, "int3")


def test_ask_quantize_int8_runs_and_int4_on_the_cpu_is_one_error_line(folder: Path) -> None:
    from typer.testing import CliRunner

    from bluelm_cli.cli.app import app

    runner = CliRunner()
    ok = runner.invoke(app, ["ask", "--model", str(folder), "--device", "cpu", "--quantize", "int8", "-t", "0", "-n", "6",
                             "--json", "hello"])
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.stdout)["new_tokens"] <= 6
    refused = runner.invoke(app, ["ask", "--model", str(folder), "--device", "cpu", "--quantize", "int4", "hello"])
    assert refused.exit_code == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        "Error: --quantize int4 needs a CUDA GPU (torchao's int4 kernels); on the CPU use --quantize int8")
    bad = runner.invoke(app, ["ask", "--model", str(folder), "--quantize", "int3", "hello"])
    assert bad.exit_code == 2 and "quantize must be 'int8', 'int4' or 'none', got 'int3'" in bad.stderr
