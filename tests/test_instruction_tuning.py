"""instruction_tuning.fine_tune's early stopping and validation loss, in process: the tensors themselves."""

import copy

import click
import pytest
import torch
import torch.nn.functional as F

from support import instruction_data
from support.instruction_tuning import ALL_BATCHES, fine_tune, validation_loss
from gpt import GPTModel

SMALL = dict(vocab_size=100, emb_dim=16, context_length=32, n_heads=2, n_layers=1, drop_rate=0.0,
             qkv_bias=False)


def small_batches(count):
    """Batches built by the real collate from random sequences of a 100-token vocabulary."""
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 99, (int(length),), generator=generator).tolist()
                 for length in torch.randint(5, 30, (4 * count,), generator=generator)]
    return [instruction_data.collate(sequences[i:i + 4], 32, end_of_text_id=99)
            for i in range(0, 4 * count, 4)]


def test_early_stopping_restores_a_copy_of_the_best_epochs_weights():
    """Validation loss falls for two epochs, then rises: the weights must go back to epoch 2."""
    torch.manual_seed(0)
    model = GPTModel(SMALL)
    batches = small_batches(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    snapshots = {}

    def on_epoch(epoch, train_loss, val_loss):
        snapshots[epoch] = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        if epoch == 2:  # from now on climb the loss instead of descending it
            optimizer.param_groups[0]["maximize"] = True

    best_epoch, epochs_run, history = fine_tune(
        model, optimizer, batches, batches, torch.device("cpu"), "fp32", on_epoch=on_epoch)
    assert (best_epoch, epochs_run) == (2, 3)
    assert history[1][1] < history[0][1] and history[2][1] > history[1][1]
    restored = model.state_dict()
    assert restored.keys() == snapshots[2].keys()
    for name, tensor in restored.items():
        assert torch.equal(tensor, snapshots[2][name]), name
    changed = [name for name in restored if not torch.equal(restored[name], snapshots[3][name])]
    assert "out_head.weight" in changed and "tok_emb.weight" in changed


def test_early_stopping_keeps_the_last_epoch_when_max_epochs_comes_first():
    torch.manual_seed(0)
    model = GPTModel(SMALL)
    batches = small_batches(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    snapshots, wrapped = {}, []

    def progress(loader, epoch):  # what a script's progress bar gets: each epoch's batches
        wrapped.append(epoch)
        return iter(loader)

    best_epoch, epochs_run, history = fine_tune(
        model, optimizer, batches, batches, torch.device("cpu"), "fp32", max_epochs=2,
        on_epoch=lambda epoch, *_: snapshots.update({epoch: copy.deepcopy(model.state_dict())}),
        progress=progress)
    assert (best_epoch, epochs_run) == (2, 2) and history[1][1] < history[0][1]
    assert all(torch.equal(tensor, snapshots[2][name]) for name, tensor in model.state_dict().items())
    assert wrapped == [1, 2]


def test_diverged_fine_tuning_stops_with_one_line():
    torch.manual_seed(0)
    model = GPTModel(SMALL)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e12)
    with pytest.raises(click.ClickException, match=r"fine-tuning diverged: validation loss (nan|inf) after epoch 1"):
        fine_tune(model, optimizer, small_batches(1), small_batches(1), torch.device("cpu"), "fp32")


def test_the_validation_loss_is_the_mean_of_batch_means_over_five_batches_or_all():
    """The seed's over the first 5 batches (test_ift.py), the later original's over all of
    them (ift_generate_test_responses.py): each the unweighted mean of the batches' means,
    as both compute it, in the loss fine_tune goes by."""
    torch.manual_seed(0)
    model = GPTModel(SMALL)
    batches = small_batches(7)
    with torch.no_grad():
        means = [F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).item() for inputs, targets in batches]
    assert validation_loss(model, batches, torch.device("cpu"), "fp32") == pytest.approx(sum(means[:5]) / 5, rel=1e-6)
    assert validation_loss(model, batches, torch.device("cpu"), "fp32", ALL_BATCHES) == \
        pytest.approx(sum(means) / 7, rel=1e-6)
    assert abs(sum(means) / 7 - sum(means[:5]) / 5) > 1e-3
    # fine_tune measures what it is told to: with a learning rate of 0 nothing changes.
    for validation_batches, expected in ((None, sum(means) / 7), (5, sum(means[:5]) / 5)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        _, _, history = fine_tune(model, optimizer, batches[:1], batches, torch.device("cpu"), "fp32",
                                  max_epochs=1, validation_batches=validation_batches)
        assert history[0][1] == pytest.approx(expected, rel=1e-6)
