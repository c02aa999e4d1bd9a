"""An independent, deliberately plain BlueLM forward pass: the test oracle.

Written from docs/MODEL.md (the model facts), sharing no code with `bluelm_cli`. It reads a checkpoint
folder (config.json plus weights in any of the published formats) and computes full-sequence
float32 logits for a [1, T] batch of ids, with no cache and no cleverness:

    embed -> LayerNorm(weight, bias, eps=rms_norm_eps)
          -> N x [ h = x + o(attn(RMSNorm(x)));  x = h + down(silu(gate(RMSNorm(h))) * up(RMSNorm(h))) ]
          -> RMSNorm -> lm_head
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F


def load_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, in float32, whatever the file format."""
    folder = Path(folder)
    files: list[Path]
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = [folder / f for f in sorted(set(weight_map.values()))]
            break
    else:
        if (folder / "model.safetensors").exists():
            files = [folder / "model.safetensors"]
        elif (folder / "pytorch_model.bin").exists():
            files = [folder / "pytorch_model.bin"]
        else:
            raise FileNotFoundError(f"no weights in {folder}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            part = load_file(str(f))
        else:
            part = torch.load(f, map_location="cpu", weights_only=True)
        for name, tensor in part.items():
            assert name not in sd, f"{name} is in more than one shard"
            sd[name] = tensor.float()
    return sd


def reference_inv_freq(config: dict) -> torch.Tensor:
    """RoPE inverse frequencies (float64) for a config, including BlueLM's `ntkmixed` scaling."""
    d = config["hidden_size"] // config["num_attention_heads"]
    base = float(config.get("rope_theta", 10000.0))
    half = d // 2
    out = []
    scaling = config.get("rope_scaling")
    if scaling is not None and scaling.get("type") != "ntkmixed":
        raise NotImplementedError(f"reference has no rope_scaling type {scaling.get('type')!r}")
    for i in range(half):
        f = base ** (-2.0 * i / d)
        if scaling is not None:
            k = float(scaling["factor"])
            b = float(scaling["power"])
            a = math.log(k) / (half**b)
            f = f / math.exp(a * (i + 1) ** b)
        out.append(f)
    return torch.tensor(out, dtype=torch.float64)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@torch.no_grad()
def reference_logits(folder: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits [1, T, vocab_size] for ids [1, T] (or [T])."""
    return forward(load_config(folder), load_state_dict(folder), input_ids)


@torch.no_grad()
def forward(cfg: dict, sd: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    """The forward pass on an already loaded config and float32 state dict."""
    ids = torch.as_tensor(input_ids).reshape(1, -1).long()
    T = ids.shape[1]
    H = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    d = H // nh
    eps = float(cfg["rms_norm_eps"])

    x = F.embedding(ids, sd["model.embed_tokens.weight"])
    if cfg.get("use_stable_embedding", True):
        x = F.layer_norm(x, (H,), sd["model.embed_layer_norm.weight"], sd["model.embed_layer_norm.bias"], eps)

    inv_freq = reference_inv_freq(cfg)
    pos = torch.arange(T, dtype=torch.float64)
    angles = torch.outer(pos, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)  # [T, d]
    cos = angles.cos().float()
    sin = angles.sin().float()
    causal = torch.ones(T, T, dtype=torch.bool).tril()

    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        h_in = _rms_norm(x, sd[p + "input_layernorm.weight"], eps)
        q = (h_in @ sd[p + "self_attn.q_proj.weight"].T).view(1, T, nh, d).transpose(1, 2)
        k = (h_in @ sd[p + "self_attn.k_proj.weight"].T).view(1, T, nkv, d).transpose(1, 2)
        v = (h_in @ sd[p + "self_attn.v_proj.weight"].T).view(1, T, nkv, d).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if nkv != nh:
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1)
        attn = (probs @ v).transpose(1, 2).reshape(1, T, H)
        h = x + attn @ sd[p + "self_attn.o_proj.weight"].T

        m = _rms_norm(h, sd[p + "post_attention_layernorm.weight"], eps)
        gate = F.silu(m @ sd[p + "mlp.gate_proj.weight"].T)
        up = m @ sd[p + "mlp.up_proj.weight"].T
        x = h + (gate * up) @ sd[p + "mlp.down_proj.weight"].T

    x = _rms_norm(x, sd["model.norm.weight"], eps)
    return x @ sd["lm_head.weight"].T


@torch.no_grad()
def reference_greedy(folder: Path, input_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    """Greedy continuation by recomputing the full sequence each step (slow but obviously right)."""
    cfg, sd = load_config(folder), load_state_dict(folder)
    ids = torch.as_tensor(input_ids).reshape(1, -1).long()
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(forward(cfg, sd, ids)[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out
