"""Our checkpoints <-> Hugging Face transformers' GPT-2: weights, config and tokenizer files.

Our GPTModel *is* GPT-2 (learned positions, pre-norm blocks, tanh GELU, LayerNorm eps
1e-5), so converting is renaming plus three layout differences:
  - transformers keeps GPT-2's Conv1D layers, whose weight is (in, out): the transpose
    of nn.Linear's (out, in);
  - its attention has one fused `c_attn` projection for Q, K and V (we have three, with
    no bias when qkv_bias is false: GPT-2 then gets a zero bias, which adds nothing);
  - GPT-2 ties its output head to the token embedding (transformers then has no
    `lm_head.weight` in the file); ours ties it with model.json's "tie_weights", or
    keeps a separate `out_head`.

A mixture-of-experts model ("moe") has no transformers equivalent at all: GPT-2 there has
one feed-forward layer per block, so such a checkpoint is refused by name before any
work (refuse_mixture_of_experts).

transformers itself reads and writes its side: GPT2LMHeadModel.from_pretrained loads a
Hub id or a directory (and checks every tensor against config.json), GPT2Config,
GenerationConfig and GPT2TokenizerFast write config.json, generation_config.json and the
tokenizer files, which are built from the vendored rank file, so nothing is downloaded.
This module does the mapping, reads a checkpoint for export or a transformers model for
import, and writes the transformers directory (export_hf.py's files, test_benchmarks.py's
temporary copy); the scripts do the rest of the I/O (the model card, the push to the Hub,
staging, lm-eval). transformers is imported where it is used: it takes seconds.
"""

import contextlib
import json
import re
from pathlib import Path

import click
import torch
from safetensors.torch import save_file


from .weights import check_state_dict, check_weights_config, model_shapes, read_weights, with_tied_names
from . import tokenizer
from .config import read_json_object, validate_model_config
from .safe_files import first_line
from gpt import GPTModel

GPT2_MODEL_TYPE = "gpt2"
# The model.json keys that have a GPT-2 equivalent ("tie_weights" is its
# tie_word_embeddings); a checkpoint with any other key (a future architecture option)
# can't be written as a plain GPT2LMHeadModel.
GPT2_EXPRESSIBLE_KEYS = ("vocab_size", "emb_dim", "context_length", "n_heads", "n_layers",
                         "drop_rate", "qkv_bias", "tie_weights")
# What scores a mixture-of-experts checkpoint instead of anything built on transformers.
OUR_OWN_SCORING = "score it with our own test_loss.py, test_smoke.py or test_ift.py instead"
# transformers' names for GPT-2's tanh-approximated GELU (the same function, ours too).
TANH_GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh")
LAYER_NORM_EPS = 1e-5
# The weights files transformers looks for, in its order of preference: from the Hub only
# the safetensors ones are taken (a pickle from the internet could run code).
HUB_WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json")
LOCAL_WEIGHTS_FILES = (*HUB_WEIGHTS_FILES, "pytorch_model.bin", "pytorch_model.bin.index.json")
# GPT-2's old attention-mask buffers, which OpenAI's checkpoints still carry (under the bare
# GPT2Model's names): no weights, and nothing GPT2LMHeadModel loads, but not all
# transformers releases leave both out of the unexpected tensors they report.
_MASK_BUFFER = re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")


class HFFormatError(click.ClickException):
    """A model that can't be converted (not GPT-2-shaped, missing or mis-shaped tensors)."""


def causal_mask(context_length):
    """The buffer the seed's attention saves in every checkpoint (1 above the diagonal)."""
    return torch.triu(torch.ones(context_length, context_length), diagonal=1)


# --- weights ---

def _paired_names(n_layers):
    """(our name, transformers' name, transposed?) for every tensor except Q/K/V and the head."""
    yield "tok_emb.weight", "transformer.wte.weight", False
    yield "pos_emb.weight", "transformer.wpe.weight", False
    for i in range(n_layers):
        ours, theirs = f"trf_blocks.{i}.", f"transformer.h.{i}."
        yield ours + "norm1.scale", theirs + "ln_1.weight", False
        yield ours + "norm1.shift", theirs + "ln_1.bias", False
        yield ours + "att.out_proj.weight", theirs + "attn.c_proj.weight", True
        yield ours + "att.out_proj.bias", theirs + "attn.c_proj.bias", False
        yield ours + "norm2.scale", theirs + "ln_2.weight", False
        yield ours + "norm2.shift", theirs + "ln_2.bias", False
        yield ours + "ff.layers.0.weight", theirs + "mlp.c_fc.weight", True
        yield ours + "ff.layers.0.bias", theirs + "mlp.c_fc.bias", False
        yield ours + "ff.layers.2.weight", theirs + "mlp.c_proj.weight", True
        yield ours + "ff.layers.2.bias", theirs + "mlp.c_proj.bias", False
    yield "final_norm.scale", "transformer.ln_f.weight", False
    yield "final_norm.shift", "transformer.ln_f.bias", False


def _qkv_names(i):
    ours = f"trf_blocks.{i}.att."
    return ([ours + "W_query.", ours + "W_key.", ours + "W_value."],
            f"transformer.h.{i}.attn.c_attn.")


def _transposed(tensor):
    return tensor.t().contiguous()  # safetensors stores contiguous tensors only


def heads_are_tied(state_dict):
    return torch.equal(state_dict["out_head.weight"], state_dict["tok_emb.weight"])


def to_transformers(state_dict, cfg):
    """Our (checked) state dict, both names of a tied matrix present -> GPT2LMHeadModel's.
    Returns (tensors, tied).

    A tied model ("tie_weights"), or an untied one whose head happens to equal the token
    embedding, is saved tied, as GPT-2 is: no `lm_head.weight` (transformers ties it to
    `wte` on loading). Any other head is written as `lm_head.weight`.
    """
    tensors = {}
    for ours, theirs, transpose in _paired_names(cfg["n_layers"]):
        tensors[theirs] = _transposed(state_dict[ours]) if transpose else state_dict[ours]
    for i in range(cfg["n_layers"]):
        qkv, c_attn = _qkv_names(i)
        tensors[c_attn + "weight"] = _transposed(torch.cat([state_dict[n + "weight"] for n in qkv]))
        if cfg["qkv_bias"]:
            tensors[c_attn + "bias"] = torch.cat([state_dict[n + "bias"] for n in qkv])
        else:
            weight = state_dict[qkv[0] + "weight"]
            tensors[c_attn + "bias"] = weight.new_zeros(3 * cfg["emb_dim"])
    tied = bool(cfg.get("tie_weights")) or heads_are_tied(state_dict)
    if not tied:
        tensors["lm_head.weight"] = state_dict["out_head.weight"]
    return tensors, tied


def from_transformers(tensors, cfg, tied):
    """GPT2LMHeadModel's state dict (as from_pretrained loaded it) -> (our config, our state dict).

    `cfg` is our model config derived from the checkpoint's config.json. qkv_bias comes
    out false when every Q/K/V bias is exactly zero (dropping them changes no number);
    the state dict carries the seed's mask buffers. A tied GPT-2 becomes a tied model of
    ours ("tie_weights": true), its out_head.weight the very tensor of tok_emb.weight
    (weights.tensors_to_save then writes it once); an untied one keeps its own head.
    """
    cfg = dict(cfg, qkv_bias=any(
        bool(tensors[f"transformer.h.{i}.attn.c_attn.bias"].any()) for i in range(cfg["n_layers"])
    ))
    state_dict = {}
    for ours, theirs, transpose in _paired_names(cfg["n_layers"]):
        state_dict[ours] = _transposed(tensors[theirs]) if transpose else tensors[theirs]
    d = cfg["emb_dim"]
    for i in range(cfg["n_layers"]):
        qkv, c_attn = _qkv_names(i)
        weights = tensors[c_attn + "weight"].split(d, dim=1)
        biases = tensors[c_attn + "bias"].split(d)
        for name, weight, bias in zip(qkv, weights, biases):
            state_dict[name + "weight"] = _transposed(weight)
            if cfg["qkv_bias"]:
                state_dict[name + "bias"] = bias.clone()
        state_dict[f"trf_blocks.{i}.att.mask"] = causal_mask(cfg["context_length"])
    if tied:
        cfg["tie_weights"] = True
        state_dict["out_head.weight"] = state_dict["tok_emb.weight"]
    else:
        state_dict["out_head.weight"] = tensors["lm_head.weight"]
    return cfg, state_dict


def our_shapes(cfg):
    """Every tensor of our GPTModel's state dict for cfg, with its shape, read off a model
    built on the meta device: no memory is allocated, so GPT-2 XL costs nothing."""
    with torch.device("meta"):
        return model_shapes(GPTModel(cfg))


def check_our_tensors(state_dict, cfg, path):
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped tensor.

    The mask buffers may be missing: every reader rebuilds them.
    """
    shapes = our_shapes(cfg)
    masks = {name for name in shapes if name.endswith(".att.mask")}
    check_state_dict(state_dict, shapes, path, may_be_missing=masks)


# --- a checkpoint in, a transformers directory out ---

def mixture_of_experts_refusal(cfg, model_config_path, instead=OUR_OWN_SCORING, context=""):
    """The line (context, if given, first) that refuses a model.json with "moe" wherever
    transformers' GPT-2 is needed (export, upload, lm-eval), or None for any other model."""
    if cfg.get("moe") is None:
        return None
    return (f"{context}{model_config_path}: key 'moe': a mixture-of-experts model has no transformers "
            f"equivalent (its GPT-2 has one feed-forward layer per block); {instead}")


def refuse_mixture_of_experts(cfg, model_config_path, instead=OUR_OWN_SCORING):
    refusal = mixture_of_experts_refusal(cfg, model_config_path, instead)
    if refusal is not None:
        raise HFFormatError(refusal)


def read_exportable_checkpoint(model_config_path, weights_path, moe_instead=OUR_OWN_SCORING):
    """(model config, state dict) of a checkpoint that can be written as a GPT2LMHeadModel;
    a tied one's state dict has both names of its matrix, whether the file is ours or the
    original's (each holds it once, as out_head.weight).

    Refused with one line naming the file and key or tensor, model.json's before any
    weights are read: a mixture of experts (the line ends with moe_instead: what to do
    instead), a model.json key with no GPT-2 equivalent, weights written for another
    model.json, a missing or mis-shaped tensor.
    """
    raw = read_json_object(model_config_path)
    cfg = validate_model_config(raw, model_config_path)
    refuse_mixture_of_experts(cfg, model_config_path, moe_instead)
    for key in cfg:
        if key not in GPT2_EXPRESSIBLE_KEYS:
            raise HFFormatError(
                f"{model_config_path}: key '{key}' has no GPT-2 equivalent, so this model can't be "
                "exported as a transformers GPT2LMHeadModel"
            )
    # Weights that record their model config are refused by another model.json.
    check_weights_config(weights_path, cfg, model_config_path)
    weights = with_tied_names(read_weights(weights_path), cfg, weights_path)
    check_our_tensors(weights, cfg, weights_path)
    return cfg, weights


def has_gpt2_tokenizer(cfg):
    """Whether GPT-2's tokenizer fits the model: every one of its ids has an embedding."""
    return cfg["vocab_size"] >= tokenizer.VOCAB_SIZE


def write_transformers_model(directory, cfg, weights):
    """Write a GPT2LMHeadModel that AutoModelForCausalLM loads into an existing directory:
    model.safetensors, config.json, generation_config.json, and GPT-2's tokenizer files
    when has_gpt2_tokenizer(cfg). Returns (tied, dtype, parameter count)."""
    directory = Path(directory)
    # A tied model's state dict may name its matrix once (a file's, a gathered one's).
    weights = with_tied_names(weights, cfg, "the weights to export")
    tensors, tied = to_transformers(weights, cfg)
    dtype = weights["tok_emb.weight"].dtype
    # transformers reads the "format" entry to know these are PyTorch tensors.
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    transformers_config(cfg, tied, dtype).save_pretrained(directory)
    generation_config(cfg).save_pretrained(directory)
    if has_gpt2_tokenizer(cfg):
        write_tokenizer_files(directory, cfg["context_length"])
    return tied, dtype, sum(tensor.numel() for tensor in tensors.values())


# --- a transformers model in ---

def read_transformers_model(hf_model, from_hub):
    """(our model config, our state dict, tied, parameter count) of a transformers GPT-2:
    a Hub repo id (its safetensors weights only) or a local directory.

    config.json is read first, so a model that isn't GPT-2 is refused before any weights
    are downloaded. Refused with one line naming the file and the key or tensor: a config
    our model can't compute the same way, no weights file, an unreadable one, a missing,
    mis-shaped or unexpected tensor. The count is transformers': a tied head once.
    """
    if from_hub:
        weights_name, config_path = _hub_weights_and_config(hf_model)
    else:
        config_path = Path(hf_model) / "config.json"
    hf_config = read_json_object(config_path)
    cfg = model_config_from_transformers(hf_config, config_path)
    tied = hf_config.get("tie_word_embeddings", True)  # GPT2Config's default
    if not isinstance(tied, bool):
        raise HFFormatError(
            f"{config_path}: key 'tie_word_embeddings' must be true or false, got {json.dumps(tied)}"
        )
    if not from_hub:
        weights_name = _local_weights_file(Path(hf_model))
    model = _load_gpt2(hf_model, from_hub, weights_name, cfg)
    parameters = model.num_parameters()
    cfg, state_dict = from_transformers(model.state_dict(), cfg, tied)
    return validate_model_config(cfg, config_path), state_dict, tied, parameters


def _local_weights_file(directory):
    for name in LOCAL_WEIGHTS_FILES:
        if (directory / name).is_file():
            return directory / name
    raise HFFormatError(f"{directory}: no model.safetensors or pytorch_model.bin found")


def _hub_weights_and_config(repo_id):
    """(the weights file's name, the downloaded config.json) of a Hub repo with safetensors
    weights. Its file list is asked for first: transformers, told to take safetensors only
    from a repo without them, would ask a conversion service to make some. Offline, the
    cache answers instead (and transformers asks no service)."""
    from huggingface_hub import constants, hf_hub_download, list_repo_files

    with _asking_the_hub(repo_id):
        files = (*HUB_WEIGHTS_FILES, "config.json") if constants.HF_HUB_OFFLINE else list_repo_files(repo_id)
    weights = next((name for name in HUB_WEIGHTS_FILES if name in files), None)
    if weights is None:
        raise HFFormatError(f"{repo_id}: no model.safetensors on the Hugging Face Hub (only "
                            "safetensors weights are taken from the Hub)")
    if "config.json" not in files:
        raise HFFormatError(f"{repo_id}: no config.json on the Hugging Face Hub")
    with _asking_the_hub(repo_id):
        return f"hf://{repo_id}/{weights}", Path(hf_hub_download(repo_id, "config.json"))


@contextlib.contextmanager
def _asking_the_hub(repo_id):
    """Any failure of the block as one line (the Hub client's exception types change
    between releases)."""
    try:
        yield
    except Exception as error:
        raise _hub_error(repo_id, error) from None


def _hub_error(repo_id, error):
    """One line for a failed Hub request; transformers wraps the Hub client's errors in OSError."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    causes = [error]
    while causes[-1].__cause__ is not None:
        causes.append(causes[-1].__cause__)
    if any(isinstance(cause, GatedRepoError) for cause in causes):
        return click.ClickException(
            f"{repo_id}: a gated repo on the Hugging Face Hub; accept its terms on the Hub, "
            "then log in (`hf auth login` or HF_TOKEN)")
    if any(isinstance(cause, RepositoryNotFoundError) for cause in causes):
        return click.ClickException(
            f"{repo_id}: no such model repo on the Hugging Face Hub (or it is private and "
            "you are not logged in: `hf auth login` or HF_TOKEN)")
    return click.ClickException(
        f"{repo_id}: download from the Hugging Face Hub failed: {first_line(error)}")


def _load_gpt2(hf_model, from_hub, weights_name, cfg):
    """GPT2LMHeadModel.from_pretrained, with every tensor it could not load refused by name."""
    import transformers

    try:
        model, loading = transformers.GPT2LMHeadModel.from_pretrained(
            hf_model,
            use_safetensors=True if from_hub else None,  # a local pytorch_model.bin: weights_only
            ignore_mismatched_sizes=True,  # so that mis-shaped tensors are listed, not raised
            output_loading_info=True)
    except Exception as error:  # its exception types, like the Hub client's, vary between releases
        if from_hub and isinstance(error, OSError):
            raise _hub_error(hf_model, error) from None
        raise HFFormatError(f"{weights_name}: not a readable weights file ({first_line(error)})") from None
    missing = sorted(loading["missing_keys"])
    unexpected = sorted(name for name in loading["unexpected_keys"] if not _MASK_BUFFER.match(name))
    mismatched = sorted(loading["mismatched_keys"])  # (name, stored shape, needed shape)
    if missing:
        raise HFFormatError(f"{weights_name}: tensor '{missing[0]}' is missing")
    if mismatched:
        name, stored, needed = mismatched[0]
        raise HFFormatError(
            f"{weights_name}: tensor '{name}' has shape {tuple(stored)}, but config.json "
            f"(n_embd={cfg['emb_dim']}, n_positions={cfg['context_length']}, "
            f"vocab_size={cfg['vocab_size']}) needs {tuple(needed)}")
    if unexpected:
        raise HFFormatError(f"{weights_name}: unexpected tensor '{unexpected[0]}': GPT-2 has no such weight")
    return model


# --- config ---

def transformers_config(cfg, tied, dtype):
    """config.json's GPT2Config: our architecture, spelled out in GPT-2's keys."""
    import transformers

    eot = tokenizer.END_OF_TEXT_ID if cfg["vocab_size"] > tokenizer.END_OF_TEXT_ID else None
    return transformers.GPT2Config(
        vocab_size=cfg["vocab_size"],
        n_positions=cfg["context_length"],
        n_embd=cfg["emb_dim"],
        n_layer=cfg["n_layers"],
        n_head=cfg["n_heads"],
        # GPT2Config's defaults, and our model's math: written out, as we depend on them.
        n_inner=None,  # 4 * n_embd
        activation_function="gelu_new",
        layer_norm_epsilon=LAYER_NORM_EPS,
        resid_pdrop=cfg["drop_rate"],
        embd_pdrop=cfg["drop_rate"],
        attn_pdrop=cfg["drop_rate"],
        tie_word_embeddings=tied,
        bos_token_id=eot,
        eos_token_id=eot,
        architectures=["GPT2LMHeadModel"],
        torch_dtype=dtype,  # transformers 4's name, which 5 takes too (for its `dtype`)
    )


# transformers' text-generation pipeline asks for this many new tokens when the model's
# generation config names no length.
TRANSFORMERS_PIPELINE_NEW_TOKENS = 256


def default_max_new_tokens(context_length):
    """Half the context, at most transformers' usual 256: GPT-2 has no position past
    n_positions (generating beyond it is an IndexError), so the other half is left for
    the prompt -- a short prompt always fits (64 + 64 at context 128), and a 1024-context
    model keeps the pipeline's 256."""
    return max(1, min(TRANSFORMERS_PIPELINE_NEW_TOKENS, context_length // 2))


def generation_config(cfg):
    import transformers

    eot = tokenizer.END_OF_TEXT_ID if cfg["vocab_size"] > tokenizer.END_OF_TEXT_ID else None
    return transformers.GenerationConfig(bos_token_id=eot, eos_token_id=eot,
                                         max_new_tokens=default_max_new_tokens(cfg["context_length"]))


def model_config_from_transformers(hf_config, path):
    """Our model.json keys from a GPT-2 config.json; anything GPT2LMHeadModel allows but
    our GPTModel can't compute the same way is refused, naming the key."""
    model_type = hf_config.get("model_type")
    if model_type != GPT2_MODEL_TYPE:
        raise HFFormatError(
            f"{path}: key 'model_type' is {json.dumps(model_type)}; only GPT-2 models "
            f"(\"{GPT2_MODEL_TYPE}\") can be imported"
        )

    def get(key, default):
        return hf_config.get(key, default)

    def refuse(key, wanted):
        raise HFFormatError(
            f"{path}: key '{key}' is {json.dumps(hf_config.get(key))}; our GPT model needs {wanted}"
        )

    if get("activation_function", "gelu_new") not in TANH_GELU_NAMES:
        refuse("activation_function", " or ".join(json.dumps(n) for n in TANH_GELU_NAMES))
    if get("layer_norm_epsilon", LAYER_NORM_EPS) != LAYER_NORM_EPS:
        refuse("layer_norm_epsilon", "1e-05")
    if get("scale_attn_weights", True) is not True:
        refuse("scale_attn_weights", "true")
    if get("scale_attn_by_inverse_layer_idx", False) is not False:
        refuse("scale_attn_by_inverse_layer_idx", "false")
    if get("add_cross_attention", False) is not False:
        refuse("add_cross_attention", "false")
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        if key not in hf_config:
            raise HFFormatError(f"{path}: missing key '{key}'")
        value = hf_config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            refuse(key, "an integer >= 1")
    n_embd = hf_config["n_embd"]
    if n_embd % hf_config["n_head"]:
        refuse("n_embd", f"a multiple of n_head ({hf_config['n_head']})")
    if get("n_inner", None) not in (None, 4 * n_embd):
        refuse("n_inner", f"null or 4 * n_embd ({4 * n_embd})")
    drop_rate = get("resid_pdrop", 0.1)
    if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not 0 <= drop_rate < 1:
        refuse("resid_pdrop", "a number in [0, 1)")
    return {
        "vocab_size": hf_config["vocab_size"],
        "emb_dim": n_embd,
        "context_length": hf_config["n_positions"],
        "n_heads": hf_config["n_head"],
        "n_layers": hf_config["n_layer"],
        # One rate for all three of GPT-2's dropouts (OpenAI's are all 0.1).
        "drop_rate": float(drop_rate),
        "qkv_bias": True,  # from_transformers decides, from the biases themselves
    }


# --- tokenizer files ---

def write_tokenizer_files(directory, model_max_length):
    """GPT-2's tokenizer, built from the vendored rank file: tokenizer.json and
    tokenizer_config.json (and special_tokens_map.json on transformers 4) from
    GPT2TokenizerFast.save_pretrained, plus vocab.json and merges.txt, from which readers
    without tokenizer.json build it (transformers 5 no longer writes them)."""
    import transformers
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab, merges = tokenizer.gpt2_vocab_and_merges()
    eot = tokenizer.END_OF_TEXT
    fast = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False))
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split pattern
    fast.decoder = decoders.ByteLevel()
    fast.post_processor = processors.ByteLevel(trim_offsets=False)
    fast.add_special_tokens([AddedToken(eot, special=True, normalized=False)])
    fast.model.save(str(directory))  # vocab.json, merges.txt
    transformers.GPT2TokenizerFast(
        tokenizer_object=fast, bos_token=eot, eos_token=eot, unk_token=eot, pad_token=None,
        add_prefix_space=False, model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    ).save_pretrained(directory)
