""""activation_checkpointing": true recomputes each block in the backward pass and changes
no number: real torchrun, two CPU processes, dropout 0.1 (the recomputation must replay
the same dropout masks)."""

import pytest
import torch

from support import checkpointing

from support import weights as weight_files
from support import parallel
from gpt import GPTModel
from helpers import MODEL, TRAIN, final_weights, latest, make_run, trained

DROPOUT_MODEL = {**MODEL, "drop_rate": 0.1}


@pytest.fixture(scope="module")
def without_checkpointing(tmp_path_factory, datasets_dir):
    return trained(make_run(tmp_path_factory.mktemp("off") / "run", model=DROPOUT_MODEL), datasets_dir)


@pytest.mark.parametrize("parallelism, tolerance", [("ddp", 1e-6), ("fsdp", 1e-5)])
def test_same_weights_with_and_without(parallelism, tolerance, tmp_path, datasets_dir, without_checkpointing):
    run_dir = trained(make_run(tmp_path / "on", model=DROPOUT_MODEL,
                               train={**TRAIN, "activation_checkpointing": True, "parallelism": parallelism}),
                      datasets_dir)
    assert latest(run_dir).meta["activation_checkpointing"] is True
    expected = final_weights(without_checkpointing)
    actual = final_weights(run_dir)
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, rtol=0, atol=tolerance, msg=key)
    for ours, theirs in zip(latest(run_dir).meta["history"], latest(without_checkpointing).meta["history"],
                            strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], abs=tolerance)
    # The checkpoint keeps the seed's names: it loads strictly into the plain model.
    weight_files.load_model(run_dir / "model.json", latest(run_dir).path / checkpointing.MODEL_FILE)


def test_blocks_run_again_in_backward_and_keep_their_names():
    torch.manual_seed(0)
    model = GPTModel(DROPOUT_MODEL)
    names = list(model.state_dict())
    parallel.checkpoint_activations(model)
    assert list(model.state_dict()) == names
    calls = []
    for block in model.trf_blocks:
        block.att.register_forward_hook(lambda *_: calls.append(1))
    inputs = torch.randint(0, 64, (2, 16))
    loss = model(inputs, targets=inputs)
    assert len(calls) == 2          # one forward per block...
    loss.backward()
    assert len(calls) == 4          # ...and each block once more in backward
    with torch.no_grad():           # no backward coming: nothing recomputed or saved
        model(inputs, targets=inputs)
    assert len(calls) == 6
