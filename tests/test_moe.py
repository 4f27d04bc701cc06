"""The original's later model options in gpt.py: weight tying ("tie_weights") and the
mixture of experts ("moe"), against bench/naive_gpt.py's step-by-step version of the
original's code (one boolean mask per expert), plus the routing statistics and the
load-balancing loss the training loop reads from `return_routing=True`."""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt import GPTModel, MixtureOfExperts, generate, load_balancing_loss, routing_statistics
from support import parallel

from test_gpt import paired_models, tiny_config as dense_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from naive_gpt import NaiveGPTModel, masked_loop_mixture, naive_generate  # noqa: E402


def tiny_config(**overrides):
    """test_gpt.py's tiny model, smaller still: eight experts of it must stay quick."""
    return dense_config(**{"vocab_size": 97, "emb_dim": 32, "context_length": 24, **overrides})


def moe_config(num_experts=4, num_active_experts=2, **overrides):
    return tiny_config(moe={"num_experts": num_experts, "num_active_experts": num_active_experts}, **overrides)


def loss_and_grads(model, token_ids, targets, fused):
    if fused:
        loss = model(token_ids, targets=targets)
    else:
        loss = F.cross_entropy(model(token_ids).flatten(0, 1), targets.flatten())
    loss.backward()
    grads = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_close_grads(actual, expected, rtol=1e-5):
    assert actual.keys() == expected.keys()
    for name, reference in expected.items():
        assert (actual[name] - reference).abs().max() <= rtol * reference.abs().max() + 1e-7, name


def token_batch(cfg, batch=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg["vocab_size"], (batch, cfg["context_length"]), generator=generator)
            for _ in range(2)]


# --- weight tying ---

def test_tied_model_has_one_shared_parameter_and_the_untied_models_initial_weights():
    torch.manual_seed(3)
    untied = GPTModel(tiny_config())
    torch.manual_seed(3)
    tied = GPTModel(tiny_config(tie_weights=True))
    assert tied.out_head.weight is tied.tok_emb.weight
    assert tied.out_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    assert len(list(tied.parameters())) == len(list(untied.parameters())) - 1
    assert "out_head.weight" not in dict(tied.named_parameters())
    # The head was built (its draws happened) before being tied: all else is the untied model's.
    untied_state, tied_state = untied.state_dict(), tied.state_dict()
    assert tied_state.keys() == untied_state.keys()
    for name, tensor in untied_state.items():
        if name != "out_head.weight":
            assert torch.equal(tied_state[name], tensor), name
    assert torch.equal(tied_state["out_head.weight"], untied_state["tok_emb.weight"])


def test_tied_fused_loss_gradient_is_embedding_plus_head_gradient():
    cfg = tiny_config(tie_weights=True)
    torch.manual_seed(0)
    tied = GPTModel(cfg)
    token_ids, targets = token_batch(cfg)
    targets[0, :5] = -100
    fused_loss, fused = loss_and_grads(tied, token_ids, targets, fused=True)
    unfused_loss, unfused = loss_and_grads(tied, token_ids, targets, fused=False)
    assert torch.allclose(fused_loss, unfused_loss, rtol=1e-6)
    assert_close_grads(fused, unfused)

    # The same weights untied: the shared gradient is the sum of the two separate ones.
    untied = GPTModel(tiny_config())
    untied.load_state_dict(tied.state_dict())
    _, separate = loss_and_grads(untied, token_ids, targets, fused=True)
    both = separate.pop("tok_emb.weight") + separate.pop("out_head.weight")
    assert torch.allclose(fused["tok_emb.weight"], both, rtol=1e-5, atol=1e-7)
    assert separate["pos_emb.weight"].abs().max() > 0
    assert_close_grads({name: fused[name] for name in separate}, separate)


# --- mixture of experts: layout and errors ---

def test_moe_parameter_names_and_construction_order_are_the_originals():
    cfg = moe_config(num_experts=3, n_layers=1)
    torch.manual_seed(5)
    ours = GPTModel(cfg)
    torch.manual_seed(5)
    naive = NaiveGPTModel(cfg)  # built in the original's order: router, then experts 0..E-1
    names = list(ours.state_dict())
    assert "trf_blocks.0.ff.router.weight" in names and "trf_blocks.0.ff.router.bias" not in names
    assert not any(".ff.layers." in name for name in names)
    assert [name for name in names if ".ff." in name] == ["trf_blocks.0.ff.router.weight"] + [
        f"trf_blocks.0.ff.experts.{j}.layers.{i}.{kind}"
        for j in range(3) for i in (0, 2) for kind in ("weight", "bias")]
    assert ours.state_dict()["trf_blocks.0.ff.router.weight"].shape == (3, 32)
    for name, tensor in naive.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name


@pytest.mark.parametrize("num_experts, num_active_experts, message", [
    (4, 1, "Can't train with `num_active_experts` < 2 (got 1)"),
    (4, 5, "self.num_active_experts=5 is larger than self.num_experts=4"),
])
def test_impossible_expert_counts_are_refused_with_the_originals_messages(num_experts, num_active_experts,
                                                                          message):
    with pytest.raises(ValueError) as raised:
        GPTModel(moe_config(num_experts, num_active_experts))
    assert str(raised.value) == message


def test_all_experts_active_and_the_balance_file_key_are_accepted():
    cfg = tiny_config(moe={"num_experts": 3, "num_active_experts": 3, "log_moe_balance_file": "balance.jsonl"})
    naive, ours = paired_models(cfg)
    token_ids, _ = token_batch(cfg)
    with torch.no_grad():
        assert torch.allclose(ours(token_ids), naive(token_ids), rtol=1e-5, atol=1e-5)
    assert not Path("balance.jsonl").exists()


# --- mixture of experts: the numbers ---

@pytest.mark.parametrize("num_experts, num_active_experts", [(4, 2), (5, 3)])
def test_moe_forward_and_backward_equal_the_originals_masked_loop(num_experts, num_active_experts):
    cfg = moe_config(num_experts, num_active_experts)
    naive, ours = paired_models(cfg, seed=1)
    token_ids, targets = token_batch(cfg, seed=1)
    with torch.no_grad():
        expected_logits = naive(token_ids)
        assert torch.allclose(ours(token_ids), expected_logits, rtol=1e-5, atol=1e-5)
    naive_loss, naive_grads = loss_and_grads(naive, token_ids, targets, fused=False)
    our_loss, our_grads = loss_and_grads(ours, token_ids, targets, fused=True)
    assert torch.allclose(our_loss, naive_loss, rtol=1e-5)
    assert_close_grads(our_grads, naive_grads, rtol=1e-4)


def test_routing_outputs_and_their_gradients_equal_the_masked_loops():
    torch.manual_seed(2)
    layer = MixtureOfExperts(moe_config(num_experts=6, num_active_experts=2))
    x = torch.randn(3, 10, 32, requires_grad=True)
    probe = [torch.randn(3, 10, 32), torch.randn(3, 10, 6), torch.randn(3, 10, 6)]

    def value_and_grads(mixture):
        output, (router_logits, expert_weights) = mixture(x)
        outputs = (output, router_logits, expert_weights)
        sum(((tensor * weight).sum() for tensor, weight in zip(outputs, probe))).backward()
        grads = [x.grad.clone()] + [parameter.grad.clone() for parameter in layer.parameters()]
        x.grad = None
        layer.zero_grad(set_to_none=True)
        return [tensor.detach() for tensor in outputs], grads

    ours, our_grads = value_and_grads(layer)
    theirs, their_grads = value_and_grads(lambda x: masked_loop_mixture(layer.router, layer.experts, 2, x))
    for actual, expected in zip(ours + our_grads, theirs + their_grads, strict=True):
        assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_exactly_k_experts_per_token_even_when_all_router_logits_tie():
    torch.manual_seed(3)
    layer = MixtureOfExperts(moe_config(num_experts=5, num_active_experts=3))
    with torch.no_grad():
        layer.router.weight.zero_()  # every logit 0: a >= k-th-largest rule would pick all five
    x = torch.randn(2, 7, 32)
    output, (_, expert_weights) = layer(x)
    chosen = expert_weights > 0
    assert (chosen.sum(-1) == 3).all()
    assert torch.allclose(expert_weights[chosen], torch.full((2 * 7 * 3,), 1 / 3))
    picked = chosen.reshape(-1, 5).nonzero()[:, 1].view(-1, 3)
    expected = torch.stack([sum(layer.experts[j](token) for j in experts) / 3
                            for token, experts in zip(x.reshape(-1, 32), picked)])
    assert torch.allclose(output.reshape(-1, 32), expected, rtol=1e-5, atol=1e-6)


def test_every_parameter_gets_a_gradient_when_an_expert_gets_no_token():
    cfg = moe_config(num_experts=4, num_active_experts=2)
    torch.manual_seed(4)
    model = GPTModel(cfg).train()
    with torch.no_grad():  # every token reaches block 0's experts as the same vector: two experts idle
        model.trf_blocks[0].norm2.scale.zero_()
        model.trf_blocks[0].norm2.shift.uniform_(-1, 1)
    token_ids, targets = token_batch(cfg)
    loss, routing = model(token_ids, targets=targets, return_routing=True)
    loss.backward()
    idle = (routing[0][1] == 0).all(dim=(0, 1)).nonzero().flatten().tolist()
    assert len(idle) == 2
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
    for expert in idle:
        for parameter in model.trf_blocks[0].ff.experts[expert].parameters():
            assert not parameter.grad.any()


@pytest.mark.parametrize("overrides", [{"moe": {"num_experts": 4, "num_active_experts": 2}},
                                       {"tie_weights": True}], ids=["moe", "tied"])
def test_kv_cache_decoding_equals_full_recomputation(overrides):
    cfg = tiny_config(**overrides)
    naive, ours = paired_models(cfg, seed=6)
    prompt = torch.randint(0, cfg["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(6))
    new_tokens = 20  # 9 + 20 > context 24: the window is cropped and re-encoded once
    expected = naive_generate(naive, prompt, new_tokens, cfg["context_length"])[0, 9:]
    assert generate(ours, [prompt[0].tolist()], new_tokens)[0] == expected.tolist()
    prompts = [prompt[0, :length].tolist() for length in (3, 9, 1)]
    assert generate(ours, prompts, 8) == [generate(ours, [one], 8)[0] for one in prompts]


def test_decoding_without_gradients_skips_idle_experts_and_equals_the_masked_loop():
    torch.manual_seed(7)
    layer = MixtureOfExperts(moe_config(num_experts=6, num_active_experts=2))
    calls = []
    for index, expert in enumerate(layer.experts):
        expert.register_forward_hook(lambda module, inputs, output, index=index: calls.append(index))
    x = torch.randn(1, 1, 32)  # one sequence decoding one token: four experts idle
    with torch.no_grad():
        expected, (_, expert_weights) = masked_loop_mixture(layer.router, layer.experts, 2, x)
        calls.clear()
        assert torch.allclose(layer(x)[0], expected, rtol=1e-5, atol=1e-6)
    assert calls == expert_weights.flatten().nonzero().flatten().tolist()
    calls.clear()
    layer(x)[0].sum().backward()
    assert calls == list(range(6))  # with gradients every expert runs, on no token if need be


def test_moe_under_bf16_autocast_stays_close_to_fp32():
    cfg = moe_config()
    torch.manual_seed(8)
    model = GPTModel(cfg)
    token_ids, targets = token_batch(cfg, batch=2)
    expected = model(token_ids, targets=targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, bf16_routing = model(token_ids, targets=targets, return_routing=True)
    loss.backward()
    assert abs(loss.item() - expected.item()) < 0.05 * expected.item()
    assert bf16_routing[0][0].dtype == torch.bfloat16 and bf16_routing[0][1].dtype == torch.float32
    assert all(torch.isfinite(parameter.grad).all() for parameter in model.parameters())


# --- routing information ---

def test_forward_returns_logits_unless_routing_is_asked_for():
    cfg = moe_config(n_layers=3)
    model = GPTModel(cfg)
    token_ids, targets = token_batch(cfg, batch=2)
    logits = model(token_ids)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 24, 97)
    loss, routing = model(token_ids, targets=targets, return_routing=True)
    assert loss.shape == () and len(routing) == 3
    for router_logits, expert_weights in routing:
        assert router_logits.shape == expert_weights.shape == (2, 24, 4)
        assert router_logits.requires_grad  # for a load-balancing loss
        assert torch.allclose(expert_weights.sum(-1), torch.ones(2, 24))
    dense_logits, dense_routing = GPTModel(tiny_config())(token_ids, return_routing=True)
    assert dense_logits.shape == (2, 24, 97) and dense_routing == []


def hand_routing():
    """Two MoE layers, E=3, k=2, two tokens, with logits whose softmaxes are simple fractions."""
    def layer(probabilities, top_weights):
        router_logits = torch.tensor(probabilities).log().view(1, 2, 3).requires_grad_()
        return router_logits, torch.tensor(top_weights).view(1, 2, 3)
    return [
        layer([[1 / 6, 1 / 2, 1 / 3], [1 / 2, 1 / 8, 3 / 8]], [[0, 3 / 5, 2 / 5], [4 / 7, 0, 3 / 7]]),
        layer([[1 / 2, 1 / 3, 1 / 6], [1 / 2, 1 / 3, 1 / 6]], [[3 / 5, 2 / 5, 0], [3 / 5, 2 / 5, 0]]),
    ]


def test_the_mixture_computes_the_hand_routings_expert_weights():
    layer = MixtureOfExperts(moe_config(num_experts=3, num_active_experts=2, emb_dim=3))
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(3))  # router logits = the input
    for router_logits, expert_weights in hand_routing():
        _, (actual_logits, actual_weights) = layer(router_logits.detach())
        assert torch.allclose(actual_logits, router_logits) and torch.allclose(actual_weights, expert_weights)


def test_routing_statistics_by_hand():
    probabilities, weights = routing_statistics(hand_routing())
    assert probabilities.shape == weights.shape == (2, 3) and not probabilities.requires_grad
    assert torch.allclose(probabilities, torch.tensor([[1 / 3, 5 / 16, 17 / 48], [1 / 2, 1 / 3, 1 / 6]]))
    assert torch.allclose(weights, torch.tensor([[2 / 7, 3 / 10, 29 / 70], [3 / 5, 2 / 5, 0]]))
    assert routing_statistics([])[0].numel() == 0


def test_load_balancing_loss_by_hand():
    routing = hand_routing()
    loss = load_balancing_loss(routing)
    # Layer 1: f = (1/4, 1/4, 1/2), P = (1/3, 5/16, 17/48): 3 * 65/192 = 65/64.
    # Layer 2: f = (1/2, 1/2, 0), P = (1/2, 1/3, 1/6): 3 * 5/12 = 5/4.
    assert math.isclose(loss.item(), (65 / 64 + 5 / 4) / 2, rel_tol=1e-6)
    loss.backward()
    # Through P only: d/dz_t = E/T * p_t * (f - f.p_t), halved for the mean over two layers.
    # Layer 2, both tokens: p = (1/2, 1/3, 1/6), f.p = 5/12.
    assert torch.allclose(routing[1][0].grad, torch.tensor([1 / 32, 1 / 48, -5 / 96]).expand(1, 2, 3))
    uniform = [(torch.zeros(2, 5, 4), torch.full((2, 5, 4), 0.5))]
    assert math.isclose(load_balancing_loss(uniform).item(), 1.0, rel_tol=1e-6)


# --- torch.compile and activation checkpointing ---

def test_compiled_and_checkpointed_moe_training_step_equals_eager():
    cfg = moe_config(tie_weights=True)
    torch.manual_seed(9)
    model = GPTModel(cfg).train()
    token_ids, targets = token_batch(cfg, batch=2)

    def step(run):
        loss, routing = run(token_ids, targets=targets, return_routing=True)
        (loss + 0.01 * load_balancing_loss(routing)).backward()
        grads = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    eager_loss, eager_grads = step(model)
    parallel.checkpoint_activations(model)
    for run in (model, torch.compile(model, backend="aot_eager")):
        loss, grads = step(run)
        assert torch.allclose(loss, eager_loss, rtol=1e-5)
        assert_close_grads(grads, eager_grads, rtol=1e-4)
    torch._dynamo.reset()


# --- on a GPU (skipped elsewhere; bench/gpu_check.sh runs this file) ---

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def cuda_fp32():
    """fp32 matmuls without TF32, so CUDA differs from the masked loop by summation order only."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = saved


@needs_cuda
def test_cuda_moe_equals_the_masked_loop_and_repeats_bit_for_bit_under_autocast(cuda_fp32):
    cfg = moe_config(num_experts=8, num_active_experts=2, tie_weights=True)
    naive, ours = (model.to(cuda_fp32).train() for model in paired_models(cfg, seed=10))
    token_ids, targets = (tensor.to(cuda_fp32) for tensor in token_batch(cfg, batch=4, seed=10))
    naive_loss, naive_grads = loss_and_grads(naive, token_ids, targets, fused=False)
    our_loss, our_grads = loss_and_grads(ours, token_ids, targets, fused=True)
    assert torch.allclose(our_loss, naive_loss, rtol=1e-5)
    assert_close_grads(our_grads, naive_grads, rtol=1e-4)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cuda", dtype=dtype):
            loss, first = loss_and_grads(ours, token_ids, targets, fused=True)
            _, second = loss_and_grads(ours, token_ids, targets, fused=True)
        assert abs(loss.item() - our_loss.item()) < 2e-2 * our_loss.item(), dtype
        assert all(torch.isfinite(grad).all() for grad in first.values()), dtype
        # The last mixture's gradients pass no attention backward (whose kernels may use
        # atomics): the dispatch itself must add up in a fixed order.
        for name, grad in first.items():
            if name.startswith(f"trf_blocks.{cfg['n_layers'] - 1}.ff."):
                assert torch.equal(grad, second[name]), (dtype, name)


@needs_cuda
def test_cuda_compiled_and_checkpointed_moe_step_equals_eager(cuda_fp32):
    cfg = moe_config(num_experts=8, num_active_experts=2)
    torch.manual_seed(11)
    model = GPTModel(cfg).to(cuda_fp32).train()
    token_ids, targets = (tensor.to(cuda_fp32) for tensor in token_batch(cfg, batch=4, seed=11))
    eager_loss, eager_grads = loss_and_grads(model, token_ids, targets, fused=True)
    parallel.checkpoint_activations(model)
    compiled = torch.compile(model)  # inductor: Triton kernels around the dispatch's graph break
    for _ in range(2):
        loss = compiled(token_ids, targets=targets)
        loss.backward()
        grads = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        assert torch.allclose(loss, eager_loss, rtol=1e-4)
        assert_close_grads(grads, eager_grads, rtol=1e-3)
    torch._dynamo.reset()


@needs_cuda
def test_cuda_kv_cache_decoding_equals_full_recomputation(cuda_fp32):
    cfg = moe_config(num_experts=8, num_active_experts=2, tie_weights=True)
    naive, ours = (model.to(cuda_fp32) for model in paired_models(cfg, seed=12))
    prompt = torch.randint(0, cfg["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(12))
    expected = naive_generate(naive, prompt.to(cuda_fp32), 20, cfg["context_length"])[0, 9:]
    assert generate(ours, [prompt[0].tolist()], 20)[0] == expected.tolist()
