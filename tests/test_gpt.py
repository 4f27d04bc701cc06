"""GPTModel against the seed's formulas, the seed's state-dict layout, and KV-cache decoding."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt import GPTModel, generate, next_token_from_logits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from naive_gpt import NaiveGPTModel, naive_generate  # noqa: E402


def tiny_config(**overrides):
    cfg = dict(vocab_size=503, emb_dim=64, context_length=32, n_heads=4, n_layers=2,
               drop_rate=0.0, qkv_bias=False)
    cfg.update(overrides)
    return cfg


def paired_models(cfg, seed=0):
    torch.manual_seed(seed)
    naive = NaiveGPTModel(cfg).eval()
    ours = GPTModel(cfg).eval()
    ours.load_state_dict(naive.state_dict(), strict=True)
    return naive, ours


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_logits_match_the_seed_formulas(qkv_bias):
    cfg = tiny_config(qkv_bias=qkv_bias)
    naive, ours = paired_models(cfg)
    token_ids = torch.randint(0, cfg["vocab_size"], (3, cfg["context_length"]))
    with torch.no_grad():
        expected = naive(token_ids)
        actual = ours(token_ids)
    relative_error = (actual - expected).abs().max() / expected.abs().max()
    assert relative_error < 1e-5


def test_gradients_match_the_seed_formulas():
    cfg = tiny_config()
    naive, ours = paired_models(cfg)
    token_ids = torch.randint(0, cfg["vocab_size"], (2, 16))
    targets = torch.randint(0, cfg["vocab_size"], (2, 16))
    for model in (naive, ours):
        logits = model(token_ids)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    naive_grads = dict(naive.named_parameters())
    for name, parameter in ours.named_parameters():
        expected = naive_grads[name].grad
        assert (parameter.grad - expected).abs().max() <= 1e-5 * expected.abs().max() + 1e-8, name


def test_parameter_names_are_the_seeds():
    cfg = tiny_config(n_layers=1, qkv_bias=True)
    names = set(GPTModel(cfg).state_dict())
    assert names == {
        "tok_emb.weight", "pos_emb.weight",
        "trf_blocks.0.att.W_query.weight", "trf_blocks.0.att.W_query.bias",
        "trf_blocks.0.att.W_key.weight", "trf_blocks.0.att.W_key.bias",
        "trf_blocks.0.att.W_value.weight", "trf_blocks.0.att.W_value.bias",
        "trf_blocks.0.att.out_proj.weight", "trf_blocks.0.att.out_proj.bias",
        "trf_blocks.0.att.mask",
        "trf_blocks.0.ff.layers.0.weight", "trf_blocks.0.ff.layers.0.bias",
        "trf_blocks.0.ff.layers.2.weight", "trf_blocks.0.ff.layers.2.bias",
        "trf_blocks.0.norm1.scale", "trf_blocks.0.norm1.shift",
        "trf_blocks.0.norm2.scale", "trf_blocks.0.norm2.shift",
        "final_norm.scale", "final_norm.shift", "out_head.weight",
    }
    assert not any(name.endswith("bias") and "W_" in name
                   for name in GPTModel(tiny_config(qkv_bias=False)).state_dict())


def test_seed_checkpoint_loads_strictly_and_ours_loads_into_the_seeds(tmp_path):
    cfg = tiny_config()
    torch.manual_seed(1)
    seed_file = tmp_path / "seed.safetensors"
    save_file(NaiveGPTModel(cfg).state_dict(), seed_file)
    seed_state = load_file(seed_file)
    assert any(key.endswith("att.mask") for key in seed_state)
    ours = GPTModel(cfg)
    ours.load_state_dict(seed_state, strict=True)

    our_file = tmp_path / "ours.safetensors"
    save_file(ours.state_dict(), our_file)
    NaiveGPTModel(cfg).load_state_dict(load_file(our_file), strict=True)
    mask = load_file(our_file)["trf_blocks.1.att.mask"]
    assert torch.equal(mask, torch.triu(torch.ones(32, 32), diagonal=1))


@pytest.mark.parametrize("prompt_length, new_tokens", [(5, 20), (12, 45)])  # 12+45 > context 32
def test_kv_cache_greedy_equals_full_recomputation(prompt_length, new_tokens):
    cfg = tiny_config()
    naive, ours = paired_models(cfg, seed=2)
    prompt = torch.randint(0, cfg["vocab_size"], (1, prompt_length))
    expected = naive_generate(naive, prompt, new_tokens, cfg["context_length"])[0, prompt_length:]
    actual = generate(ours, [prompt[0].tolist()], new_tokens)[0]
    assert actual == expected.tolist()


def test_batched_generation_equals_one_at_a_time():
    cfg = tiny_config(qkv_bias=True)
    _, ours = paired_models(cfg, seed=3)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg["vocab_size"], (length,), generator=generator).tolist()
               for length in (1, 7, 30, 4)]
    one_at_a_time = [generate(ours, [prompt], 40)[0] for prompt in prompts]
    assert generate(ours, prompts, 40) == one_at_a_time


def test_generation_stops_at_end_of_text():
    cfg = tiny_config()
    _, ours = paired_models(cfg, seed=4)
    prompts = [[1, 2, 3], [4, 5]]
    free_run = generate(ours, prompts, 10)
    eos_id = free_run[0][3]  # pretend the 4th token of the first sequence is end-of-text
    stopped = generate(ours, prompts, 10, eos_id=eos_id)
    assert stopped[0] == free_run[0][:free_run[0].index(eos_id)]
    second = free_run[1]
    assert stopped[1] == (second[:second.index(eos_id)] if eos_id in second else second)


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert next_token_from_logits(logits).tolist() == [1]
    # top_k=1 leaves only the most likely token, whatever the temperature
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        assert next_token_from_logits(logits, 5.0, top_k=1, generator=generator).tolist() == [1]
    # top_k=2 never picks outside the two most likely tokens
    generator = torch.Generator().manual_seed(0)
    picks = {next_token_from_logits(logits, 10.0, top_k=2, generator=generator).item()
             for _ in range(200)}
    assert picks == {1, 3}


def test_dropout_is_active_in_training_mode_only():
    cfg = tiny_config(drop_rate=0.5)
    model = GPTModel(cfg)
    token_ids = torch.randint(0, cfg["vocab_size"], (2, 8))
    model.train()
    assert not torch.equal(model(token_ids), model(token_ids))
    model.eval()
    assert torch.equal(model(token_ids), model(token_ids))


@pytest.mark.parametrize("chunk_elements", [2 ** 24, 503 * 7])  # one chunk; many uneven chunks
def test_fused_loss_equals_cross_entropy_of_logits(monkeypatch, chunk_elements):
    import gpt
    monkeypatch.setattr(gpt, "LOSS_CHUNK_ELEMENTS", chunk_elements)
    cfg = tiny_config()
    _, ours = paired_models(cfg, seed=5)
    token_ids = torch.randint(0, cfg["vocab_size"], (3, 20))
    targets = torch.randint(0, cfg["vocab_size"], (3, 20))
    targets[0, :6] = -100  # ignored positions, as test_ift's padding uses

    expected = torch.nn.functional.cross_entropy(ours(token_ids).flatten(0, 1), targets.flatten())
    expected.backward()
    expected_grads = {name: p.grad.clone() for name, p in ours.named_parameters()}
    ours.zero_grad()
    actual = ours(token_ids, targets=targets)
    actual.backward()

    assert torch.allclose(actual, expected, rtol=1e-6)
    for name, parameter in ours.named_parameters():
        reference = expected_grads[name]
        assert (parameter.grad - reference).abs().max() <= 1e-5 * reference.abs().max() + 1e-9, name
    with torch.no_grad():
        assert torch.allclose(ours(token_ids, targets=targets), expected, rtol=1e-6)


def reference_attention(queries, keys, values, keep_scaled=None):
    """The seed's attention: full score matrix, -inf above the diagonal, softmax of
    scores / sqrt(head_dim), optional dropout (given as the 0 or 1/(1-p) multipliers)."""
    num_tokens, head_dim = queries.shape[-2:]
    scores = queries @ keys.transpose(-2, -1)
    future = torch.ones(num_tokens, num_tokens, dtype=torch.bool).triu(1)
    weights = torch.softmax(scores.masked_fill(future, float("-inf")) / head_dim ** 0.5, dim=-1)
    if keep_scaled is not None:
        weights = weights * keep_scaled
    return weights @ values


def attention_inputs(num_tokens, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, num_tokens, 16, generator=generator, requires_grad=True) for _ in range(3)]


def value_and_grads(attention, inputs):
    output = attention(*inputs)
    (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum().backward()
    grads = [tensor.grad.clone() for tensor in inputs]
    for tensor in inputs:
        tensor.grad = None
    return output.detach(), grads


@pytest.mark.parametrize("num_tokens, block_size", [(50, 16), (48, 16), (10, 128)])
def test_blockwise_attention_with_dropout_equals_the_seeds(num_tokens, block_size):
    from gpt import blockwise_causal_attention
    inputs = attention_inputs(num_tokens)
    dropout_p = 0.3
    torch.manual_seed(7)
    actual, actual_grads = value_and_grads(
        lambda q, k, v: blockwise_causal_attention(q, k, v, dropout_p, block_size), inputs)

    # The same dropout masks, drawn in the blockwise order: one draw per block of query
    # rows, shaped (batch, heads, rows in the block, keys up to the block's end).
    torch.manual_seed(7)
    keep_scaled = torch.zeros(2, 3, num_tokens, num_tokens)
    for start in range(0, num_tokens, block_size):
        end = min(start + block_size, num_tokens)
        keep_scaled[..., start:end, :end] = torch.nn.functional.dropout(
            torch.ones(2, 3, end - start, end), dropout_p)
    causal = torch.ones(num_tokens, num_tokens, dtype=torch.bool).tril()
    assert abs((keep_scaled[..., causal] == 0).float().mean() - dropout_p) < 0.1
    expected, expected_grads = value_and_grads(
        lambda q, k, v: reference_attention(q, k, v, keep_scaled), inputs)

    assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-6)
    for actual_grad, expected_grad in zip(actual_grads, expected_grads):
        assert torch.allclose(actual_grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_blockwise_attention_without_dropout_equals_sdpa():
    from gpt import blockwise_causal_attention
    inputs = attention_inputs(70, seed=3)
    actual, actual_grads = value_and_grads(
        lambda q, k, v: blockwise_causal_attention(q, k, v, 0.0, 32), inputs)
    expected, expected_grads = value_and_grads(
        lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), inputs)
    assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-6)
    for actual_grad, expected_grad in zip(actual_grads, expected_grads):
        assert torch.allclose(actual_grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_training_with_dropout_on_a_cpu_takes_the_blockwise_path(monkeypatch):
    import gpt
    calls = []
    original = gpt.blockwise_causal_attention
    monkeypatch.setattr(gpt, "blockwise_causal_attention",
                        lambda *args: calls.append(args[3]) or original(*args))
    cfg = tiny_config(drop_rate=0.1)
    model = GPTModel(cfg)
    token_ids = torch.randint(0, cfg["vocab_size"], (2, 8))
    model.train()
    model(token_ids)
    assert calls == [0.1] * cfg["n_layers"]
    model.eval()
    model(token_ids)
    assert len(calls) == cfg["n_layers"]  # evaluation keeps the fused, dropout-free kernel


def test_blockwise_attention_under_bf16_autocast_stays_close_to_fp32():
    from gpt import blockwise_causal_attention
    queries, keys, values = (tensor.detach() for tensor in attention_inputs(40, seed=4))
    expected = blockwise_causal_attention(queries, keys, values, 0.0, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = blockwise_causal_attention(queries, keys, values, 0.0, 16)
    assert actual.dtype == torch.bfloat16
    assert (actual.float() - expected).abs().max() < 0.05 * expected.abs().max()
