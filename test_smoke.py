"""Sample a continuation from a model: the quick "does it produce text?" check.

    uv run python test_smoke.py MODEL_CONFIG_PATH MODEL_SAFETENSORS_PATH

Defaults are the seed's: prompt "Every effort moves you", 20 new tokens,
temperature 1.4, top-k 25.
"""

import click

from support import tokenizer

# The line printed between the prompt and the generated text.
SEPARATOR = "--- generated ---"


@click.command()
@click.argument("model_config_path", type=click.Path(dir_okay=False))
@click.argument("model_safetensors_path", type=click.Path(dir_okay=False))
@click.option("--prompt", default="Every effort moves you", show_default=True,
              help="The text the model continues.")
@click.option("--num-tokens", default=20, show_default=True, type=click.IntRange(min=1),
              help="How many new tokens to generate.")
@click.option("--temperature", default=1.4, show_default=True, type=click.FloatRange(min=0.0),
              help="Softmax temperature; 0 means greedy decoding.")
@click.option("--top-k", default=25, show_default=True, type=click.IntRange(min=1),
              help="Sample only from the k most likely tokens.")
@click.option("--seed", default=None, type=int, help="Random seed, for reproducible samples.")
@click.option("--device", default=None, help="cuda, mps or cpu (default: the best available).")
def main(model_config_path, model_safetensors_path, prompt, num_tokens, temperature, top_k,
         seed, device):
    """Print a prompt and the model's continuation of it, sampled from a checkpoint.

    The prompt comes first, then a line "--- generated ---", then the new text exactly
    as decoded (often starting with a space): prompt and new text joined are the whole.
    """
    # Imported only now that the command line is parsed: torch takes seconds to import,
    # and --help or a mistyped option should answer at once.
    import torch

    from support.weights import load_model
    from support.devices import resolve_device
    from gpt import generate

    try:
        device = resolve_device(device)
    except (ValueError, RuntimeError) as error:
        raise click.BadParameter(str(error), param_hint="--device") from None
    if seed is not None:
        torch.manual_seed(seed)
    model = load_model(model_config_path, model_safetensors_path, device)
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise click.BadParameter("the prompt is empty", param_hint="--prompt")
    new_ids = generate(model, [prompt_ids], num_tokens, temperature=temperature, top_k=top_k)[0]
    # Decoded apart, the two halves still join to the whole text: the prompt's tokens end
    # on a character boundary, since they were encoded from text.
    print(tokenizer.decode(prompt_ids))
    print(SEPARATOR)
    print(tokenizer.decode(new_ids))


if __name__ == "__main__":
    main()
