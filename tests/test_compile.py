"""The training step under torch.compile: one graph (no graph breaks), the same numbers.

fullgraph=True makes any graph break an error. The aot_eager backend traces forward
and backward as inductor would see them but runs eager kernels, so this checks the
model's compile-safety on a CPU in seconds; the GPU speed itself is bench/'s job. One
real compiled 2-rank ddp_train.py run (inductor) checks the path users switch on.
"""

import math

import pytest
import torch

from gpt import GPTModel
from helpers import MODEL, TRAIN, final_weights, latest, make_run, run_training, write_toy_dataset

CONFIG = dict(vocab_size=503, emb_dim=64, context_length=32, n_heads=4, n_layers=2,
              drop_rate=0.0, qkv_bias=False)


def loss_and_grads(model, token_ids, targets, run=None):
    loss = (model if run is None else run)(token_ids, targets=targets)
    loss.backward()
    grads = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("drop_rate", [0.0, 0.1])  # SDPA; the CPU's blockwise dropout path
def test_training_forward_and_backward_compile_to_one_graph(drop_rate):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPTModel({**CONFIG, "drop_rate": drop_rate}).train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    token_ids = torch.randint(0, CONFIG["vocab_size"], (2, 32))
    targets = torch.randint(0, CONFIG["vocab_size"], (2, 32))

    torch.manual_seed(1)
    compiled_loss, compiled_grads = loss_and_grads(model, token_ids, targets, run=compiled)
    assert torch.isfinite(compiled_loss)
    if drop_rate == 0.0:  # without dropout the two must agree
        eager_loss, eager_grads = loss_and_grads(model, token_ids, targets)
        assert torch.allclose(compiled_loss, eager_loss, rtol=1e-5)
        for name, grad in eager_grads.items():
            assert torch.allclose(compiled_grads[name], grad, rtol=1e-4, atol=1e-6), name
    else:
        assert all(torch.isfinite(grad).all() for grad in compiled_grads.values())


def test_evaluation_logits_compile_to_one_graph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPTModel(CONFIG).eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    token_ids = torch.randint(0, CONFIG["vocab_size"], (3, 20))
    with torch.no_grad():
        assert torch.allclose(compiled(token_ids), model(token_ids), rtol=1e-5, atol=1e-5)


def test_a_compiled_two_rank_run_trains_as_the_uncompiled_one(tmp_path):
    """ddp_train.py with "compile": true (inductor, C++ kernels on a CPU) under torchrun,
    DDP and gloo: the same losses and final weights as without compile (dropout off, since
    inductor draws its own dropout masks)."""
    datasets_dir = tmp_path / "datasets"
    write_toy_dataset(datasets_dir / "toy")
    finals = {}
    for use_compile in (False, True):
        run_dir = make_run(tmp_path / f"compile-{use_compile}", MODEL, {**TRAIN, "compile": use_compile})
        result = run_training(run_dir, datasets_dir)
        assert result.returncode == 0, result.stderr[-3000:]
        finals[use_compile] = (latest(run_dir).meta, final_weights(run_dir))
    (eager_meta, eager_weights), (compiled_meta, compiled_weights) = finals[False], finals[True]
    assert eager_meta["global_step"] == compiled_meta["global_step"] == 3
    assert math.isclose(compiled_meta["val_loss"], eager_meta["val_loss"], rel_tol=1e-4)
    for name, tensor in eager_weights.items():
        assert torch.allclose(compiled_weights[name], tensor, rtol=1e-4, atol=1e-5), name
