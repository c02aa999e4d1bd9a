"""The contract every causal LM inside transformers keeps, kept by BlueLM on every transformers release we allow.

Output recording (hidden states, attentions, in forward and in every generation mode), tuples with
`return_dict=False`, the deprecated `past_key_values=` keyword, Auto-class registration, refusing RoPE types
the model does not implement, gradient checkpointing, the loss with `labels`, and a LoRA fine-tune via peft.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, DynamicCache

import bluelm_cli.modeling  # noqa: F401  (registers BlueLM with the Auto classes)
from bluelm_cli.modeling import BlueLMConfig, BlueLMForCausalLM, BlueLMModel
from bluelm_cli.modeling._compat import CACHE_IS_RENAMED, output_cache
from checkpoints import checkpoints  # noqa: F401

TOLERANCE = 1e-5
PAD = 3


def _load(folder: Path, attn: str = "sdpa") -> BlueLMForCausalLM:
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation=attn)
    return model.eval()


@pytest.fixture(scope="module")
def gqa_folder(checkpoints: dict[str, Path]) -> Path:
    return checkpoints["gqa"]


def _ids(batch: int, length: int, seed: int = 0, high: int = 200) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(4, high, (batch, length - 1), generator=g)
    return torch.cat([torch.ones(batch, 1, dtype=torch.long), body], dim=1)


def _padded_batch(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of lengths 12 and 7, the shorter padded on `side`."""
    long, short = _ids(1, 12, seed=1)[0], _ids(1, 7, seed=2)[0]
    pad = torch.full((5,), PAD)
    short_padded = torch.cat([pad, short]) if side == "left" else torch.cat([short, pad])
    mask_short = torch.cat([torch.zeros(5), torch.ones(7)]) if side == "left" else torch.cat([torch.ones(7), torch.zeros(5)])
    ids = torch.stack([long, short_padded])
    mask = torch.stack([torch.ones(12), mask_short]).long()
    return ids, mask


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ----------------------------------------------------------------------------------------------- forward
def test_forward_records_hidden_states_and_attentions_per_layer(gqa_folder: Path) -> None:
    model = _load(gqa_folder, attn="eager")
    config = model.config
    ids = _ids(2, 9)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, output_attentions=True)
    assert isinstance(out.hidden_states, tuple) and len(out.hidden_states) == config.num_hidden_layers + 1
    assert all(h.shape == (2, 9, config.hidden_size) for h in out.hidden_states)
    assert isinstance(out.attentions, tuple) and len(out.attentions) == config.num_hidden_layers
    assert all(a.shape == (2, config.num_attention_heads, 9, 9) for a in out.attentions)
    # the first is layer 0's input (the embedding after its LayerNorm), the last the final norm's output
    inner = model.model
    with torch.no_grad():
        embedded = inner.embed_layer_norm(inner.embed_tokens(ids))
        base = inner(ids)
    assert _max_diff(out.hidden_states[0], embedded) == 0.0
    assert _max_diff(out.hidden_states[-1], base.last_hidden_state) == 0.0
    # causal: every row of every attention map sums to one and sees nothing ahead
    for weights in out.attentions:
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))
        assert float(weights.triu(diagonal=1).abs().max()) == 0.0


def test_outputs_are_empty_unless_asked(gqa_folder: Path) -> None:
    model = _load(gqa_folder)
    with torch.no_grad():
        out = model(_ids(1, 5))
    assert out.hidden_states is None and out.attentions is None


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.slow
def test_sdpa_and_eager_agree_on_hidden_states_and_logits_with_padding(gqa_folder: Path, side: str) -> None:
    sdpa, eager = _load(gqa_folder, "sdpa"), _load(gqa_folder, "eager")
    assert (sdpa.config._attn_implementation, eager.config._attn_implementation) == ("sdpa", "eager")
    ids, mask = _padded_batch(side)
    real = mask.bool()
    with torch.no_grad():
        a = sdpa(ids, attention_mask=mask, output_hidden_states=True)
        b = eager(ids, attention_mask=mask, output_hidden_states=True)
    assert len(a.hidden_states) == len(b.hidden_states) == sdpa.config.num_hidden_layers + 1
    # Padding positions attend to nothing real; only the real tokens' states are defined.
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        assert _max_diff(ha[real], hb[real]) <= TOLERANCE
    assert _max_diff(a.logits[real], b.logits[real]) <= TOLERANCE
    # and padding really is ignored: the short prompt alone gives the same states
    short = ids[1][real[1]].unsqueeze(0)
    with torch.no_grad():
        alone = eager(short, output_hidden_states=True)
    assert _max_diff(alone.logits[0], b.logits[1][real[1]]) <= TOLERANCE


@pytest.mark.parametrize("side", ["left", "right"])
def test_eager_attentions_ignore_padding(gqa_folder: Path, side: str) -> None:
    eager = _load(gqa_folder, "eager")
    ids, mask = _padded_batch(side)
    real = mask[1].bool()
    short = ids[1][real].unsqueeze(0)
    with torch.no_grad():
        batched = eager(ids, attention_mask=mask, output_attentions=True).attentions
        alone = eager(short, output_attentions=True).attentions
    for layer_batched, layer_alone in zip(batched, alone):
        rows = layer_batched[1][:, real][:, :, real]
        assert _max_diff(rows, layer_alone[0]) <= TOLERANCE
        assert float(layer_batched[1][:, real][:, :, ~real].abs().max()) == 0.0


def test_return_dict_false_returns_a_plain_tuple(gqa_folder: Path) -> None:
    model = _load(gqa_folder, attn="eager")
    ids = _ids(1, 8)
    with torch.no_grad():
        as_dict = model(ids, labels=ids, output_hidden_states=True, output_attentions=True)
        as_tuple = model(ids, labels=ids, output_hidden_states=True, output_attentions=True, return_dict=False)
        inner = model.model(ids, return_dict=False)
    assert type(as_tuple) is tuple
    loss, logits, cache, hidden_states, attentions = as_tuple
    assert float(loss) == float(as_dict.loss)
    assert torch.equal(logits, as_dict.logits)
    assert cache.get_seq_length() == 8
    assert len(hidden_states) == len(as_dict.hidden_states) and len(attentions) == len(as_dict.attentions)
    assert type(inner) is tuple and inner[0].shape == (1, 8, model.config.hidden_size)


# ----------------------------------------------------------------------------------------------- generate
GENERATION_MODES = {
    "greedy": {"do_sample": False, "num_beams": 1},
    "sample": {"do_sample": True, "num_beams": 1, "top_k": 0, "top_p": 1.0},
    "beam": {"do_sample": False, "num_beams": 3},
    "beam-sample": {"do_sample": True, "num_beams": 3, "top_k": 0, "top_p": 1.0},
}


@pytest.mark.parametrize("mode", list(GENERATION_MODES))
def test_generate_returns_hidden_states_and_attentions_per_step(gqa_folder: Path, mode: str) -> None:
    model = _load(gqa_folder, attn="eager")
    config = model.config
    ids = _ids(2, 6, seed=3)
    new = 4
    torch.manual_seed(0)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        return_dict_in_generate=True,
        output_hidden_states=True,
        output_attentions=True,
        output_scores=True,
        pad_token_id=PAD,
        **GENERATION_MODES[mode],
    )
    rows = ids.shape[0] * GENERATION_MODES[mode]["num_beams"]
    assert out.sequences.shape == (2, ids.shape[1] + new)
    assert len(out.scores) == len(out.hidden_states) == len(out.attentions) == new
    for step, (hidden, attention) in enumerate(zip(out.hidden_states, out.attentions)):
        query = ids.shape[1] if step == 0 else 1  # the prompt first, then one token a step over the cache
        keys = ids.shape[1] + step
        assert len(hidden) == config.num_hidden_layers + 1 and len(attention) == config.num_hidden_layers
        assert all(h.shape == (rows, query, config.hidden_size) for h in hidden)
        assert all(a.shape == (rows, config.num_attention_heads, query, keys) for a in attention)


@pytest.mark.slow
def test_assisted_decoding_with_output_attentions(gqa_folder: Path) -> None:
    model = _load(gqa_folder, attn="eager")
    assistant = _load(gqa_folder, attn="eager")
    ids = _ids(1, 6, seed=4)
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": PAD}
    plain = model.generate(ids, **kwargs)
    assisted = model.generate(
        ids,
        assistant_model=assistant,
        return_dict_in_generate=True,
        output_attentions=True,
        output_hidden_states=True,
        **kwargs,
    )
    assert torch.equal(assisted.sequences, plain)
    assert len(assisted.attentions) == len(assisted.hidden_states) == 6
    for attention in assisted.attentions:
        assert len(attention) == model.config.num_hidden_layers
        assert all(a.shape[:2] == (1, model.config.num_attention_heads) for a in attention)


# ------------------------------------------------------------------------------------------- cache keyword
@pytest.mark.slow
def test_past_key_values_keyword_means_cache(gqa_folder: Path) -> None:
    model = _load(gqa_folder)
    ids = _ids(1, 14, seed=5)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        by_new, by_old = DynamicCache(config=model.config), DynamicCache(config=model.config)
        model(ids[:, :10], cache=by_new)
        model(ids[:, :10], cache=by_old)
        new = model(ids[:, 10:], cache=by_new).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            old_out = model(ids[:, 10:], past_key_values=by_old)
    assert torch.equal(old_out.logits, new)
    assert _max_diff(old_out.logits, full[:, 10:]) <= TOLERANCE
    assert output_cache(old_out) is by_old and by_old.get_seq_length() == 14
    deprecations = [str(w.message) for w in caught if issubclass(w.category, FutureWarning) and "past_key_values" in str(w.message)]
    if CACHE_IS_RENAMED:
        # transformers >= 5.24 renamed it; its own deprecation warning, exactly as its Llama gives it
        assert deprecations == ["`past_key_values` is deprecated and will be removed in version 5.40.0 for `BlueLMForCausalLM.forward`. Use `cache` instead."]
    else:
        assert deprecations == []  # before 5.24 it is transformers' own name


# ---------------------------------------------------------------------------------------------- registry
def _small_config(**overrides: object) -> BlueLMConfig:
    fields = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    return BlueLMConfig(**{**fields, **overrides})


@pytest.mark.slow
def test_auto_model_knows_the_base_model() -> None:
    config = _small_config()
    base = AutoModel.from_config(config)
    assert type(base) is BlueLMModel
    causal = AutoModelForCausalLM.from_config(config)
    assert type(causal) is BlueLMForCausalLM
    causal.model.load_state_dict(base.state_dict())
    ids = _ids(1, 5, high=120)
    with torch.no_grad():
        assert torch.equal(base(ids).last_hidden_state, causal.model(ids).last_hidden_state)


# -------------------------------------------------------------------------------------------------- RoPE
# Every type transformers computes is implemented (tests/test_rope_types.py); a type nobody implements is refused.
UNIMPLEMENTED_ROPE = [
    {"type": "su", "factor": 2.0},
    {"rope_type": "ntk-by-parts", "factor": 4.0},
]


@pytest.mark.parametrize("scaling", UNIMPLEMENTED_ROPE, ids=lambda s: s.get("type") or s.get("rope_type"))
def test_unimplemented_rope_types_are_refused(scaling: dict) -> None:
    rope_type = scaling.get("type") or scaling.get("rope_type")
    expected = (
        "BlueLM implements RoPE types 'default', 'ntkmixed', 'linear', 'dynamic', 'yarn', 'longrope', 'llama3', "
        f"'proportional', not '{rope_type}': fix the type in rope_scaling / rope_parameters of config.json"
    )
    with pytest.raises(ValueError) as raised:
        _small_config(rope_scaling=scaling)
    assert str(raised.value) == expected
    with pytest.raises(ValueError) as raised:
        _small_config(rope_parameters={**scaling, "rope_theta": 10000.0})
    assert str(raised.value) == expected
    # a config whose parameters were replaced after it was built is refused by the model too
    config = _small_config()
    config.rope_parameters = {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError) as raised:
        BlueLMForCausalLM(config)
    assert str(raised.value) == expected


# ---------------------------------------------------------------------------------------------- training
def test_labels_loss_is_next_token_cross_entropy(gqa_folder: Path) -> None:
    model = _load(gqa_folder)
    ids = _ids(2, 10, seed=6)
    labels = ids.clone()
    labels[0, :3] = -100  # ignored positions (a prompt one does not train on)
    with torch.no_grad():
        out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float()
    targets = labels[:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)
    assert abs(float(out.loss) - float(expected)) <= 1e-6
    assert float(out.loss) > 0


@pytest.mark.slow
def test_loss_trains_against_shift_labels_when_given(gqa_folder: Path) -> None:
    """Sequence/context-parallel trainers pass targets already aligned with the logits as `shift_labels`.

    transformers' generic suite checks this (test_causal_lm_loss_honors_shift_labels) only for models in its own
    name tables; here BlueLM is held to it without the transformers tree: the loss is cross entropy of every
    position's logits against `shift_labels`, and `labels` no longer matter once `shift_labels` is given.
    """
    model = _load(gqa_folder)
    ids = _ids(2, 10, seed=7)
    shift_labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    shift_labels[1, :4] = -100
    with torch.no_grad():
        out = model(ids, labels=ids, shift_labels=shift_labels)
        other_labels = model(ids, labels=torch.flip(ids, dims=[1]), shift_labels=shift_labels)
    logits = out.logits.reshape(-1, out.logits.shape[-1]).float()
    expected = torch.nn.functional.cross_entropy(logits, shift_labels.reshape(-1), ignore_index=-100)
    assert abs(float(out.loss) - float(expected)) <= 1e-6
    assert float(other_labels.loss) == float(out.loss)


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(gqa_folder: Path) -> None:
    ids = _ids(2, 12, seed=7)
    results = []
    for checkpointing in (False, True):
        model = _load(gqa_folder).train()
        assert model.supports_gradient_checkpointing
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_gradient_checkpointing
        out = model(ids, labels=ids, use_cache=False)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((float(out.loss), grads))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    assert loss_plain == loss_ckpt
    assert set(grads_plain) == set(grads_ckpt) and len(grads_plain) > 0
    for name, grad in grads_plain.items():
        assert _max_diff(grad, grads_ckpt[name]) <= TOLERANCE, name


@pytest.mark.slow
def test_lora_finetune_lowers_the_loss(checkpoints: dict[str, Path]) -> None:
    peft = pytest.importorskip("peft", reason="peft is in the test extra: pip install -e '.[test]'")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(checkpoints["safetensors"]), dtype=torch.float32)
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    tuned = peft.get_peft_model(model, lora)
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in tuned.named_parameters() if p.requires_grad)
    frozen_before = model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    ids = _ids(2, 16, seed=8)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    tuned.train()
    losses = []
    for _ in range(8):
        loss = tuned(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses
    # only the adapters moved
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight, frozen_before)
