"""Fine-tuning a checkpoint on instructions, as the seed does (chapter 7 of "Build a Large
Language Model (From Scratch)"): epochs while the validation loss falls, then back to the
best epoch's weights; and answering the test instructions greedily.

Shared by the scripts that fine-tune before answering the test instructions (test_ift.py,
ift_generate_test_responses.py); they print the progress (on_epoch, the batches of each
epoch through `progress`, the answers through `on_answered`). The two versions of the
original measure the validation loss differently: over the first 5 batches (the seed,
test_ift.py) or over all of them (the later original's ift_generate_test_responses.py):
`validation_batches`.
"""

import itertools
import math
from functools import partial

import click
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from gpt import generate

from . import instruction_data
from . import tokenizer
from .devices import autocast

VALIDATION_BATCHES = 5  # the seed's validation loss: the first five batches
ALL_BATCHES = None      # the later original's: every batch of the validation records


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
    """The unweighted mean of the first num_batches batches' mean losses (ALL_BATCHES:
    of every batch), as both versions of the original average them."""
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
              max_epochs=None, on_epoch=None, progress=None, validation_batches=VALIDATION_BATCHES):
    """Train epoch by epoch while the validation loss falls; end with the best epoch's weights.

    on_epoch(epoch, train_loss, validation_loss) is called after every epoch, and
    progress(train_loader, epoch), if given, wraps each epoch's batches (a progress bar).
    The validation loss is over validation_batches batches (ALL_BATCHES: every one).
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
        val_loss = validation_loss(model, validation_loader, device, dtype_name, validation_batches)
        history.append((train_loss, val_loss))
        if on_epoch is not None:
            on_epoch(epoch, train_loss, val_loss)
        if not math.isfinite(val_loss):  # no weights worth generating with (or paying a judge for)
            raise click.ClickException(f"fine-tuning diverged: validation loss {val_loss} after "
                                       f"epoch {epoch}: the learning rate is too high for these weights, "
                                       f"or they are not finite themselves")
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


def tune_on_records(model, train_records, validation_records, *, batch_size, learning_rate, weight_decay,
                    max_epochs, device, dtype_name, validation_batches, say=None, progress=None):
    """fine_tune with the original's loaders (training records shuffled, the last partial
    batch dropped; validation records in order, all batches) and AdamW over every
    parameter. say(line), if given, is told each epoch's losses and how it ended.
    Returns what fine_tune returns."""
    def loader(records, shuffle):
        return data_loader(records, batch_size, model.context_length, shuffle)

    def on_epoch(epoch, train_loss, val_loss):
        say(f"Epoch {epoch}: train loss {train_loss:.3f}, validation loss {val_loss:.3f}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    best_epoch, epochs_run, history = fine_tune(
        model, optimizer, loader(train_records, shuffle=True), loader(validation_records, shuffle=False),
        device, dtype_name, max_epochs, on_epoch=on_epoch if say is not None else None, progress=progress,
        validation_batches=validation_batches)
    if say is not None:
        say(outcome(best_epoch, epochs_run, history, max_epochs))
    return best_epoch, epochs_run, history


def outcome(best_epoch, epochs_run, history, max_epochs):
    """One line saying how fine-tuning ended and which epoch's weights the model has."""
    if best_epoch == 0:
        return f"Validation loss was {history[0][1]} after epoch 1: no better epoch to go back to"
    if best_epoch != epochs_run:
        return (f"Validation loss rose at epoch {epochs_run}: restored the weights of epoch "
                f"{best_epoch} (validation loss {history[best_epoch - 1][1]:.3f})")
    return f"Stopped after --max-epochs {max_epochs} with the validation loss still falling"


def summary(best_epoch, epochs_run, history):
    """The fine-tuning history as a results file keeps it."""
    return {"epochs_run": epochs_run, "best_epoch": best_epoch,
            "history": [{"epoch": epoch, "train_loss": train_loss, "validation_loss": val_loss}
                        for epoch, (train_loss, val_loss) in enumerate(history, 1)]}


# --- answering the test instructions ---

def generate_responses(model, prompts, max_new_tokens, batch_size, device, dtype_name, on_answered=None):
    """The model's greedy answer to each prompt (no top-k; up to max_new_tokens, stopping
    at end-of-text), cleaned up as both versions of the original do; on_answered(count),
    if given, is told as each batch of `count` answers is done.

    Prompts are batched by length (less left-padding); gpt.generate makes each answer
    the same as decoding its prompt alone, as the originals do. Answers come back in
    prompt order.
    """
    model.eval()
    encoded = [tokenizer.encode(prompt) for prompt in prompts]
    by_length = sorted(range(len(prompts)), key=lambda index: len(encoded[index]))
    responses = [None] * len(prompts)
    for start in range(0, len(by_length), batch_size):
        batch = by_length[start:start + batch_size]
        with autocast(device, dtype_name):
            new_tokens = generate(model, [encoded[index] for index in batch], max_new_tokens,
                                  eos_id=tokenizer.END_OF_TEXT_ID)
        for index, tokens in zip(batch, new_tokens, strict=True):
            text = tokenizer.decode(encoded[index] + tokens)
            responses[index] = instruction_data.extract_response(text, prompts[index])
        if on_answered is not None:
            on_answered(len(batch))
    return responses
