"""Weight-only int8 and int4 through torchao (`--quantize int8|int4`), applied after loading and fusing.

Batch-1 decoding reads every weight once per token, so halving (int8) or quartering (int4) the bytes read is
what makes it faster on a GPU. torchao's quantized weights are tensor subclasses that torch.compile and CUDA
graphs handle, so, unlike bitsandbytes' layers, they keep the static-cache fast path.

int8 runs on the CPU too (how it is tested); torchao's int4 weight-only kernels need a CUDA GPU and bf16 weights.
Every `nn.Linear` is quantized, lm_head included (as torchao's own figures are taken).
"""

from __future__ import annotations

import logging

import torch

from bluelm_cli.core.errors import BlueLMError

SCHEMES = ("int8", "int4")
INT4_GROUP_SIZE = 128


def _torchao():  # noqa: ANN202 - the module
    # torchao logs (not raises) that its optional CUDA extensions for other cards are missing: not ours to show.
    # torch's pytree logs a deprecation about an enum torchao registers: neither is the user's to act on.
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.quantization as quantization
    except ImportError:
        raise BlueLMError("--quantize needs torchao; install it with: pip install 'bluelm-cli[torchao]'") from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return quantization


def quantize_weights(model: torch.nn.Module, scheme: str) -> str:
    """Quantize `model`'s Linear weights in place; the label BackendInfo shows (e.g. "torchao int8 weight-only")."""
    if scheme not in SCHEMES:
        raise BlueLMError(f"unknown quantization '{scheme}'; use one of {', '.join(SCHEMES)}")
    weight = next(model.parameters())
    if scheme == "int4":
        if weight.device.type != "cuda":
            raise BlueLMError("--quantize int4 needs a CUDA GPU (torchao's int4 kernels); on the CPU use --quantize int8")
        if weight.dtype != torch.bfloat16:
            raise BlueLMError("--quantize int4 needs bfloat16 weights; add --dtype bfloat16")
    quantization = _torchao()
    if scheme == "int8":
        config = quantization.Int8WeightOnlyConfig()
    else:
        config = quantization.Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE)
    quantization.quantize_(model, config)
    return f"torchao {scheme} weight-only"
