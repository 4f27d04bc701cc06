"""Fine-tuning a checkpoint on instructions, as the seed does (chapter 7 of "Build a Large
Language Model (From Scratch)"): epochs while the validation loss falls, then back to the
best epoch's weights.

Shared by the scripts that fine-tune before answering the test instructions; they print
the progress (on_epoch, and the batches of each epoch through `progress`).
"""

import itertools
import math
from functools import partial

import click
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import instruction_data
from . import tokenizer
from .devices import autocast

VALIDATION_BATCHES = 5  # the seed's validation loss: the first five batches


def data_loader(records, batch_size, context_length, shuffle):
    """Batches of the records' training texts (prompt, response header, output), as the
    seed builds them: shuffled, and without the last partial batch, for training."""
    token_lists = [tokenizer.encode(instruction_data.format_training_text(record))
                   for record in records]
    return DataLoader(token_lists, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle,
                      collate_fn=partial(instruction_data.collate, context_length=context_length))


def batch_loss(model, inputs, targets, device, dtype_name):
    inputs, targets = inputs.to(device), targets.to(device)
    with autocast(device, dtype_name):
        logits = model(inputs)
    # Targets of instruction_data.IGNORE_INDEX (padding) are cross_entropy's ignore_index.
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


@torch.inference_mode()
def validation_loss(model, loader, device, dtype_name, num_batches=VALIDATION_BATCHES):
    model.eval()  # no dropout while measuring
    losses = [batch_loss(model, inputs, targets, device, dtype_name)
              for inputs, targets in itertools.islice(loader, num_batches)]
    return torch.stack(losses).mean().item()


def train_one_epoch(model, optimizer, scaler, batches, device, dtype_name):
    model.train()  # dropout on, as the model was pre-trained
    total, count = torch.zeros((), device=device), 0
    for inputs, targets in batches:
        loss = batch_loss(model, inputs, targets, device, dtype_name)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # the scaler only scales in fp16; a no-op otherwise
        scaler.step(optimizer)
        scaler.update()
        total += loss.detach()
        count += 1
    return total.item() / count


def fine_tune(model, optimizer, train_loader, validation_loader, device, dtype_name,
              max_epochs=None, on_epoch=None, progress=None):
    """Train epoch by epoch while the validation loss falls; end with the best epoch's weights.

    on_epoch(epoch, train_loss, validation_loss) is called after every epoch, and
    progress(train_loader, epoch), if given, wraps each epoch's batches (a progress bar).
    Returns (best_epoch, epochs_run, history) with history a list of (train_loss,
    validation_loss). A validation loss that isn't finite stops with one line.
    """
    scaler = torch.amp.GradScaler(device.type, enabled=dtype_name == "fp16")
    best_loss, best_epoch, best_weights = math.inf, 0, None
    history = []
    for epoch in itertools.count(1):
        if max_epochs is not None and epoch > max_epochs:
            break
        batches = progress(train_loader, epoch) if progress is not None else train_loader
        train_loss = train_one_epoch(model, optimizer, scaler, batches, device, dtype_name)
        val_loss = validation_loss(model, validation_loader, device, dtype_name)
        history.append((train_loss, val_loss))
        if on_epoch is not None:
            on_epoch(epoch, train_loss, val_loss)
        if not math.isfinite(val_loss):  # no weights worth generating with (or paying a judge for)
            raise click.ClickException(f"fine-tuning diverged: validation loss {val_loss} after "
                                       f"epoch {epoch}; try a lower --learning-rate")
        if not val_loss < best_loss:  # it rose (or stalled): this epoch made things worse
            break
        best_loss, best_epoch = val_loss, epoch
        # A copy, not model.state_dict() itself: that holds the live tensors, which the
        # next optimizer step would change under us. Kept on the CPU to spare device memory.
        best_weights = {name: tensor.detach().to("cpu", copy=True)
                        for name, tensor in model.state_dict().items()}
    if best_weights is not None and best_epoch != len(history):
        model.load_state_dict(best_weights)
    return best_epoch, len(history), history
