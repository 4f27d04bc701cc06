"""Our checkpoints <-> Hugging Face transformers' GPT-2: weights, config and tokenizer files.

Our GPTModel *is* GPT-2 (learned positions, pre-norm blocks, tanh GELU, LayerNorm eps
1e-5), so converting is renaming plus three layout differences:
  - transformers keeps GPT-2's Conv1D layers, whose weight is (in, out): the transpose
    of nn.Linear's (out, in);
  - its attention has one fused `c_attn` projection for Q, K and V (we have three, with
    no bias when qkv_bias is false: GPT-2 then gets a zero bias, which adds nothing);
  - GPT-2 ties its output head to the token embedding; ours is a separate `out_head`.

The tokenizer files are derived from the vendored rank file, so nothing is downloaded.
This module does the mapping, and reads a checkpoint for export and writes the
transformers directory (export_hf.py's files, test_benchmarks.py's temporary copy);
the scripts do the rest of the I/O (the model card, the Hub, staging, lm-eval).
"""

import json
import re
from pathlib import Path

import click
import torch
from safetensors.torch import save_file

from . import checkpointing

from .weights import check_state_dict, check_weights_config, read_weights
from . import tokenizer
from .config import read_json_object, validate_model_config

GPT2_MODEL_TYPE = "gpt2"
# The model.json keys that have a GPT-2 equivalent; a checkpoint with any other key
# (a future architecture option) can't be written as a plain GPT2LMHeadModel.
GPT2_EXPRESSIBLE_KEYS = ("vocab_size", "emb_dim", "context_length", "n_heads", "n_layers",
                         "drop_rate", "qkv_bias")
# transformers' names for GPT-2's tanh-approximated GELU (the same function, ours too).
TANH_GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh")
LAYER_NORM_EPS = 1e-5
# GPT-2's attention-mask buffers, which some transformers checkpoints still carry.
_HF_MASK_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


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
    """Our (checked) state dict -> GPT2LMHeadModel's. Returns (tensors, tied).

    The head is written as `lm_head.weight` unless it equals the token embedding, in
    which case the model is saved tied, as GPT-2 is (transformers then rebuilds it).
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
    tied = heads_are_tied(state_dict)
    if not tied:
        tensors["lm_head.weight"] = state_dict["out_head.weight"]
    return tensors, tied


def transformers_shapes(cfg, tied):
    """Every tensor GPT2LMHeadModel needs for our config, with its shape."""
    d, vocab = cfg["emb_dim"], cfg["vocab_size"]
    shapes = {"transformer.wte.weight": (vocab, d),
              "transformer.wpe.weight": (cfg["context_length"], d)}
    for i in range(cfg["n_layers"]):
        h = f"transformer.h.{i}."
        shapes.update({
            h + "ln_1.weight": (d,), h + "ln_1.bias": (d,),
            h + "attn.c_attn.weight": (d, 3 * d), h + "attn.c_attn.bias": (3 * d,),
            h + "attn.c_proj.weight": (d, d), h + "attn.c_proj.bias": (d,),
            h + "ln_2.weight": (d,), h + "ln_2.bias": (d,),
            h + "mlp.c_fc.weight": (d, 4 * d), h + "mlp.c_fc.bias": (4 * d,),
            h + "mlp.c_proj.weight": (4 * d, d), h + "mlp.c_proj.bias": (d,),
        })
    shapes["transformer.ln_f.weight"] = (d,)
    shapes["transformer.ln_f.bias"] = (d,)
    if not tied:
        shapes["lm_head.weight"] = (vocab, d)
    return shapes


def normalise_transformers_names(tensors):
    """Give GPT-2's tensors GPT2LMHeadModel's names and drop the old attention-mask buffers.

    OpenAI's checkpoints on the Hub were saved from the bare GPT2Model, so their names
    lack the `transformer.` prefix (`h.0.attn.c_attn.weight`, `wte.weight`). Names that
    are no part of GPT-2 are kept as they are, to be refused by name.
    """
    named = {}
    for name, tensor in tensors.items():
        if name.startswith(("wte.", "wpe.", "h.", "ln_f.")):
            name = "transformer." + name
        if not _HF_MASK_BUFFER.match(name):
            named[name] = tensor
    return named


def from_transformers(tensors, cfg, tied, path):
    """GPT2LMHeadModel's tensors (normalised names) -> (our config, our state dict).

    `cfg` is our model config derived from the checkpoint's config.json. Missing,
    unexpected and mis-shaped tensors are refused, naming the tensor. qkv_bias comes
    out false when every Q/K/V bias is exactly zero (dropping them changes no number);
    the state dict carries the seed's mask buffers.
    """
    expected = transformers_shapes(cfg, tied)
    for name, shape in expected.items():
        if name not in tensors:
            raise HFFormatError(f"{path}: tensor '{name}' is missing")
        if tuple(tensors[name].shape) != shape:
            raise HFFormatError(
                f"{path}: tensor '{name}' has shape {tuple(tensors[name].shape)}, but config.json "
                f"(n_embd={cfg['emb_dim']}, n_positions={cfg['context_length']}, "
                f"vocab_size={cfg['vocab_size']}) needs {shape}"
            )
    # A tied checkpoint may still store its head; transformers ignores it in favour of
    # the embedding, and so do we.
    known = set(expected) | {"lm_head.weight"}
    for name in tensors:
        if name not in known:
            raise HFFormatError(f"{path}: unexpected tensor '{name}': GPT-2 has no such weight")

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
    # Ours is a separate matrix: a copy, not a second name for the same storage.
    head = tensors["transformer.wte.weight"] if tied else tensors["lm_head.weight"]
    state_dict["out_head.weight"] = head.clone()
    return cfg, state_dict


def our_shapes(cfg):
    """Every tensor of our GPTModel's state dict for cfg, with its shape.

    Worked out from the config rather than by building a GPTModel, which for GPT-2 XL
    would mean initialising 1.5 billion parameters just to read off their shapes.
    """
    d = cfg["emb_dim"]
    theirs_shapes = transformers_shapes(cfg, tied=True)
    shapes = {}
    for ours, theirs, transpose in _paired_names(cfg["n_layers"]):
        shape = theirs_shapes[theirs]
        shapes[ours] = shape[::-1] if transpose else shape
    for i in range(cfg["n_layers"]):
        qkv, _ = _qkv_names(i)
        for name in qkv:
            shapes[name + "weight"] = (d, d)
            if cfg["qkv_bias"]:
                shapes[name + "bias"] = (d,)
        shapes[f"trf_blocks.{i}.att.mask"] = (cfg["context_length"], cfg["context_length"])
    shapes["out_head.weight"] = (cfg["vocab_size"], d)
    return shapes


def check_our_tensors(state_dict, cfg, path):
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped tensor.

    The mask buffers may be missing: every reader rebuilds them.
    """
    shapes = our_shapes(cfg)
    masks = {name for name in shapes if name.endswith(".att.mask")}
    check_state_dict(state_dict, shapes, path, may_be_missing=masks)


# --- a checkpoint in, a transformers directory out ---

def read_exportable_checkpoint(model_config_path, weights_path):
    """(model config, state dict) of a checkpoint that can be written as a GPT2LMHeadModel.

    Refused with one line naming the file and key or tensor: a model.json key with no
    GPT-2 equivalent, weights written for another model.json, a missing or mis-shaped
    tensor.
    """
    raw = read_json_object(model_config_path)
    cfg = validate_model_config(raw, model_config_path)
    for key in raw:
        if key not in GPT2_EXPRESSIBLE_KEYS:
            raise HFFormatError(
                f"{model_config_path}: key '{key}' has no GPT-2 equivalent, so this model can't be "
                "exported as a transformers GPT2LMHeadModel"
            )
    # Weights that record their model config are refused by another model.json.
    check_weights_config(weights_path, cfg, model_config_path)
    weights = read_weights(weights_path)
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
    tensors, tied = to_transformers(weights, cfg)
    dtype = weights["tok_emb.weight"].dtype
    # transformers reads the "format" entry to know these are PyTorch tensors.
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    for file_name, content in (("config.json", transformers_config(cfg, tied, dtype)),
                               ("generation_config.json", generation_config(cfg))):
        (directory / file_name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    if has_gpt2_tokenizer(cfg):
        write_tokenizer_files(directory, cfg["context_length"])
    return tied, dtype, sum(tensor.numel() for tensor in tensors.values())


# --- config ---

def transformers_config(cfg, tied, dtype):
    """config.json for GPT2LMHeadModel (every key written out, as save_pretrained does)."""
    eot = tokenizer.END_OF_TEXT_ID if cfg["vocab_size"] > tokenizer.END_OF_TEXT_ID else None
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": GPT2_MODEL_TYPE,
        "vocab_size": cfg["vocab_size"],
        "n_positions": cfg["context_length"],
        "n_ctx": cfg["context_length"],  # read by old transformers releases
        "n_embd": cfg["emb_dim"],
        "n_layer": cfg["n_layers"],
        "n_head": cfg["n_heads"],
        "n_inner": None,  # 4 * n_embd, as ours
        "activation_function": "gelu_new",
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": cfg["drop_rate"],
        "embd_pdrop": cfg["drop_rate"],
        "attn_pdrop": cfg["drop_rate"],
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": tied,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "use_cache": True,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,  # the name transformers 4.x reads
    }


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
    eot = tokenizer.END_OF_TEXT_ID if cfg["vocab_size"] > tokenizer.END_OF_TEXT_ID else None
    return {"bos_token_id": eot, "eos_token_id": eot,
            "max_new_tokens": default_max_new_tokens(cfg["context_length"])}


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
    """vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json, and
    tokenizer.json when the `tokenizers` library is installed. Returns the names written."""
    directory = Path(directory)
    vocab, merges = tokenizer.gpt2_vocab_and_merges()
    eot = tokenizer.END_OF_TEXT
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{first} {second}\n" for first, second in merges), encoding="utf-8"
    )
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "bos_token": eot, "eos_token": eot, "unk_token": eot, "pad_token": None,
        "add_prefix_space": False,
        "add_bos_token": False,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(tokenizer.END_OF_TEXT_ID): {
            "content": eot, "lstrip": False, "rstrip": False, "normalized": False,
            "single_word": False, "special": True}},
    }, indent=2) + "\n", encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": eot, "eos_token": eot, "unk_token": eot}, indent=2) + "\n", encoding="utf-8")
    written = ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
        from tokenizers.models import BPE
    except ImportError:  # transformers builds the fast tokenizer from vocab.json + merges.txt
        return written
    fast = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False))
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split pattern
    fast.decoder = decoders.ByteLevel()
    fast.post_processor = processors.ByteLevel(trim_offsets=False)
    fast.add_special_tokens([AddedToken(eot, special=True, normalized=False)])
    fast.save(str(directory / "tokenizer.json"))
    return written + ["tokenizer.json"]
