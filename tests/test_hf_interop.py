"""export_hf.py and import_hf.py against real transformers models, tokenizers and a Hub stand-in.

The numbers are checked both ways (our logits == transformers' within 1e-4 in fp32),
the round trips bit for bit, the tokenizer on a varied text set, and the push on the
real huggingface_hub client talking to tests/servers/hub_upload.py over HTTP.
The conversions both ways run in this process through the support package's hf_gpt2 (the
scripts' own code: export_hf.py writes with write_transformers_model, import_hf.py reads
with read_transformers_model), across every layout: importing torch and transformers in a
fresh process costs seconds on this machine. The scripts themselves run as users run them,
in subprocesses, once per path of their own: the Hub download and push, the files and the
closing line, and each kind of mistake.
"""

import json
import os
import pickle
import random
import re
import resource
import shutil

import click
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model

from support import hf_gpt2
from support import safe_files
from support import tokenizer
from support import weights as weight_files
from support.weights import load_model
from gpt import GPTModel, generate
import transformers  # the dev dependency group
from helpers import SMOKE_SEPARATOR, one_line_error, run_script
from servers.hub import HubServer
from servers.hub_upload import HubUploadServer

TINY = dict(vocab_size=97, emb_dim=32, context_length=16, n_heads=4, n_layers=2,
            drop_rate=0.0, qkv_bias=False)
# The tokenizer needs GPT-2's whole vocabulary; everything else stays tiny.
FULL_VOCAB = dict(vocab_size=50257, emb_dim=16, context_length=32, n_heads=2, n_layers=1,
                  drop_rate=0.1, qkv_bias=True)
TOKEN = "hf_stand_in_token_0123456789"


# --- helpers ---

def assert_refused(result, exit_code, *fragments):
    """A user mistake: no traceback, the line on stderr holding every fragment. Exit code
    1 is an error about a file (just that line); 2 a usage error, which click prefixes
    with the usage."""
    if exit_code == 1:
        one_line_error(result, *fragments)
        assert result.stderr.startswith("Error: ")
        return
    assert result.returncode == exit_code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in last, last


def refusal(function, *args):
    """The one line a package function refuses its input with (the scripts print it as is)."""
    with pytest.raises(click.ClickException) as refused:
        function(*args)
    return refused.value.format_message()


def export(config_path, weights_path, directory):
    """export_hf.py's transformers files, by the code it writes them with (it adds the model
    card and stages the directory). Returns (tied, dtype, parameter count)."""
    cfg, weights = hf_gpt2.read_exportable_checkpoint(config_path, weights_path)
    directory.mkdir(parents=True)
    return hf_gpt2.write_transformers_model(directory, cfg, weights)


def import_local(directory):
    """import_hf.py's reading of a local directory: (cfg, state dict, tied, parameter count)."""
    return hf_gpt2.read_transformers_model(directory, from_hub=False)


def perturbed(model, seed):
    """Random values in every parameter, LayerNorm and biases included, so that any
    misplaced, transposed or dropped tensor changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


def save_ours(directory, cfg, model, writer="plain"):
    """model.json and model.safetensors (with the mask buffers): as our checkpoints write
    them ("ours": a tied matrix once, the model config in the metadata), as the original
    writes them ("original": safetensors' save_model, which keeps a tied matrix's
    alphabetically first name, out_head.weight, with the alias in the metadata), or as
    the original's first version did ("plain": save_file, no metadata)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.json").write_text(json.dumps(cfg))
    path = directory / "model.safetensors"
    if writer == "ours":
        tensors, aliases = weight_files.tensors_to_save(model.state_dict(), cfg)
        save_file(tensors, path, metadata={"format": "pt", weight_files.CONFIG_METADATA_KEY: json.dumps(cfg),
                                           **aliases})
    elif writer == "original":
        save_model(model, str(path))
    else:
        save_file(model.state_dict(), path)
    return directory / "model.json", path


def our_model(cfg, seed, equal_heads=False):
    """A GPTModel with random weights; equal_heads: untied, its head a copy of the embedding."""
    model = perturbed(GPTModel(cfg), seed)
    if equal_heads:
        with torch.no_grad():
            model.out_head.weight.copy_(model.tok_emb.weight)
    return model


def file_metadata(path):
    with safe_open(str(path), framework="pt") as file:
        return file.metadata() or {}


def transformers_gpt2(seed, tied, vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=4):
    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, tie_word_embeddings=tied,
        bos_token_id=None if vocab_size <= 50256 else 50256,
        eos_token_id=None if vocab_size <= 50256 else 50256,
    )
    return perturbed(transformers.GPT2LMHeadModel(config), seed)


def load_exported(directory):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert type(model).__name__ == "GPT2LMHeadModel"
    # No warnings about weights: nothing missing, unexpected or mis-shaped.
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(),
                    "error_msgs": []}
    return model.eval()


def printed_parameters(output):
    """The parameter count in export_hf.py's or import_hf.py's closing line."""
    (count,) = re.findall(r"([\d,]+) parameters", output)
    return int(count.replace(",", ""))


def max_logit_difference(ours, theirs, vocab_size, context_length, seed=0):
    tokens = torch.randint(0, vocab_size, (3, context_length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return (ours(tokens) - theirs(tokens).logits).abs().max().item()


# --- export, then import back ---

# (qkv_bias, model.json's tie_weights, an untied head equal to the embedding, who wrote the file)
LAYOUTS = {"untied": (False, False, False, "plain"), "untied, Q/K/V bias": (True, False, False, "ours"),
           "untied, head equal to the embedding": (False, False, True, "plain"),
           "tied, ours": (False, True, False, "ours"), "tied, Q/K/V bias, the original's": (True, True, False, "original")}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_gives_our_logits_and_imports_back_bit_for_bit(tmp_path, layout):
    qkv_bias, tie_weights, equal_heads, writer = LAYOUTS[layout]
    cfg = dict(TINY, qkv_bias=qkv_bias, **({"tie_weights": True} if tie_weights else {}))
    ours = our_model(cfg, seed=1, equal_heads=equal_heads)
    config_path, weights_path = save_ours(tmp_path / "ours", cfg, ours, writer)
    if tie_weights:  # the file holds the matrix once, as out_head.weight
        assert "tok_emb.weight" not in load_file(weights_path)
        assert file_metadata(weights_path)["tok_emb.weight"] == "out_head.weight"
    tied = tie_weights or equal_heads

    exported_tied, _, exported_parameters = export(config_path, weights_path, tmp_path / "export")
    assert exported_tied is tied
    exported = load_exported(tmp_path / "export")
    assert exported.config.tie_word_embeddings is tied
    assert exported.config.n_positions == cfg["context_length"]
    assert "auto_map" not in json.loads((tmp_path / "export" / "config.json").read_text())
    assert ("lm_head.weight" in load_file(tmp_path / "export" / "model.safetensors")) is not tied
    assert max_logit_difference(ours, exported, cfg["vocab_size"], cfg["context_length"]) < 1e-4
    assert exported_parameters == exported.num_parameters()

    back_cfg, back, back_tied, parameters = import_local(tmp_path / "export")
    assert parameters == exported_parameters  # a tied head counted once
    # Whatever tied GPT-2 comes in is a tied model of ours: one matrix under both names.
    assert back_tied is tied and back_cfg == dict(cfg, **({"tie_weights": True} if tied else {}))
    assert (back["out_head.weight"] is back["tok_emb.weight"]) is tied
    original = ours.state_dict()
    assert sorted(back) == sorted(original)  # the mask buffers included
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


def test_the_export_script_replaces_an_earlier_export_with_overwrite(tmp_path):
    """export_hf.py as users run it, over an earlier export: its files and closing line,
    the tied head counted once. (import_hf.py runs as users run it from the Hub below; a
    local directory in the refusals, where a word of transformers' on stderr would show.)"""
    cfg = dict(TINY, tie_weights=True)
    ours = our_model(cfg, seed=1)
    config_path, weights_path = save_ours(tmp_path / "ours", cfg, ours, "ours")  # without tok_emb.weight
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("an earlier export's")

    result = run_script("export_hf.py", config_path, weights_path, tmp_path / "export", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert "GPT2LMHeadModel" in result.stdout and "tied output head" in result.stdout
    exported = load_exported(tmp_path / "export")
    assert exported.config.tie_word_embeddings is True
    assert "lm_head.weight" not in load_file(tmp_path / "export" / "model.safetensors")
    assert max_logit_difference(ours, exported, TINY["vocab_size"], TINY["context_length"]) < 1e-4
    assert printed_parameters(result.stdout) == exported.num_parameters()
    assert (tmp_path / "export" / "README.md").read_text().startswith("---\nlicense: apache-2.0\n")
    assert sorted(os.listdir(tmp_path / "export")) == ["README.md", "config.json",
                                                       "generation_config.json", "model.safetensors"]


def test_our_shapes_of_gpt2_xl_come_from_a_model_that_allocates_nothing():
    xl = dict(vocab_size=50257, emb_dim=1600, context_length=1024, n_heads=25, n_layers=48,
              drop_rate=0.1, qkv_bias=True)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    shapes = hf_gpt2.our_shapes(xl)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 512 * 1024
    assert shapes["trf_blocks.47.att.W_query.weight"] == (1600, 1600)
    assert shapes["trf_blocks.47.att.mask"] == (1024, 1024)
    assert shapes["out_head.weight"] == (50257, 1600)
    # GPT-2 XL's 1,557,611,200 parameters, plus our separate head; the masks aren't parameters.
    parameters = sum(torch.Size(shape).numel() for name, shape in shapes.items() if not name.endswith(".mask"))
    assert parameters == 1_557_611_200 + 50257 * 1600


# --- import, then export back ---

def save_openai_style(model, directory, weights_file="pytorch_model.bin"):
    """The layout of OpenAI's GPT-2 on the Hub: the bare GPT2Model's names (no
    `transformer.` prefix, no lm_head) with the old attention-mask buffers."""
    directory.mkdir(parents=True)
    model.config.save_pretrained(directory)
    state_dict = {name.removeprefix("transformer."): tensor.clone()
                  for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
    n_positions = model.config.n_positions
    for i in range(model.config.n_layer):
        state_dict[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_positions, n_positions))[None, None]
        state_dict[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if weights_file.endswith(".safetensors"):
        save_file(state_dict, directory / weights_file)
    else:
        torch.save(state_dict, directory / weights_file)


@pytest.mark.parametrize("layout", ["safetensors-tied", "safetensors-untied", "openai-pickle"])
def test_import_gives_transformers_logits_and_exports_back_bit_for_bit(tmp_path, layout):
    tied = layout != "safetensors-untied"
    theirs = transformers_gpt2(seed=2, tied=tied)
    source = tmp_path / "hf"
    if layout == "openai-pickle":
        save_openai_style(theirs, source)
    else:
        theirs.save_pretrained(source)

    cfg, state_dict, imported_tied, imported_parameters = import_local(source)
    assert imported_tied is tied
    assert imported_parameters == theirs.num_parameters()  # a tied head counted once
    assert cfg == dict(TINY, drop_rate=0.1, qkv_bias=True, **({"tie_weights": True} if tied else {}))
    config_path, weights_path = tmp_path / "ours" / "model.json", tmp_path / "ours" / "model.safetensors"
    config_path.parent.mkdir()
    config_path.write_text(json.dumps(cfg))  # as import_hf.py writes them
    tensors, aliases = weight_files.tensors_to_save(state_dict, cfg)
    save_file(tensors, weights_path, metadata={"format": "pt", **aliases})
    assert ("tok_emb.weight" in tensors) is not tied  # a tied matrix once, as checkpoints hold it
    ours = load_model(config_path, weights_path)  # strict
    assert (ours.out_head.weight is ours.tok_emb.weight) is tied
    assert max_logit_difference(ours, theirs, cfg["vocab_size"], cfg["context_length"]) < 1e-4
    for i in range(cfg["n_layers"]):  # the seed's buffers, as the original scripts save them
        assert torch.equal(state_dict[f"trf_blocks.{i}.att.mask"], torch.triu(torch.ones(16, 16), diagonal=1))

    _, _, exported_parameters = export(config_path, weights_path, tmp_path / "back")
    assert exported_parameters == imported_parameters
    back = load_file(tmp_path / "back" / "model.safetensors")
    expected = {name: tensor for name, tensor in theirs.state_dict().items()
                if not (tied and name == "lm_head.weight")}
    assert sorted(back) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name


def test_import_from_the_hub_then_test_smoke_continues_like_transformers(tmp_path):
    """OpenAI's GPT-2 as the Hub serves it -- bare GPT2Model names with the old mask
    buffers, a tied head, pickles beside the safetensors -- imported by import_hf.py from
    the stand-in Hub (tests/servers/hub.py) as the tied model it is; test_smoke.py,
    unchanged, then continues the prompt exactly as transformers does with the same
    weights, test_loss.py gives transformers' loss, and the import exports back to the
    Hub's tensors bit for bit. Offline, the import comes from the Hub cache. A repo with
    only a pickle, and one that doesn't exist, are one line each."""
    theirs = transformers_gpt2(seed=3, tied=True, vocab_size=50257, n_positions=32, n_embd=16,
                               n_layer=1, n_head=2)
    repo = tmp_path / "hub" / "models" / "openai-community" / "gpt2"
    save_openai_style(theirs, repo, "model.safetensors")
    (repo / "pytorch_model.bin").write_bytes(b"the pickle is never downloaded")
    (repo / "README.md").write_text("GPT-2\n")
    save_openai_style(theirs, tmp_path / "hub" / "models" / "someone" / "pickled")  # no safetensors
    with HubServer(tmp_path / "hub") as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home")}
        result = run_script("import_hf.py", "openai-community/gpt2", tmp_path / "gpt2", env=env)
        pickled = run_script("import_hf.py", "someone/pickled", tmp_path / "pickled", env=env)
        not_found = run_script("import_hf.py", "openai-community/gpt-5", tmp_path / "gpt-5", env=env)
    # The Hub gone, offline: the cache of the first import is enough.
    offline = run_script("import_hf.py", "openai-community/gpt2", tmp_path / "gpt2-offline",
                         env={**env, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert offline.returncode == 0, offline.stderr
    online = load_file(tmp_path / "gpt2" / "model.safetensors")
    cached = load_file(tmp_path / "gpt2-offline" / "model.safetensors")
    assert online.keys() == cached.keys()
    assert all(torch.equal(online[name], cached[name]) for name in online)
    assert hub.downloads_of("model.safetensors") == 1
    assert hub.downloads_of("pytorch_model.bin") == hub.downloads_of("README.md") == 0
    assert printed_parameters(result.stdout) == theirs.num_parameters()  # the tied head once
    assert 'tied output head: "tie_weights": true, the matrix saved once' in result.stdout
    imported_config = json.loads((tmp_path / "gpt2" / "model.json").read_text())
    assert imported_config["qkv_bias"] is True and imported_config["tie_weights"] is True
    # The matrix once, as our checkpoints and the original's hold a tied model's.
    assert "tok_emb.weight" not in online and torch.equal(online["out_head.weight"],
                                                          theirs.state_dict()["transformer.wte.weight"])
    assert file_metadata(tmp_path / "gpt2" / "model.safetensors")["tok_emb.weight"] == "out_head.weight"
    assert_refused(pickled, 1, "someone/pickled: no model.safetensors on the Hugging Face Hub",
                   "only safetensors weights are taken from the Hub")
    assert not (tmp_path / "pickled").exists()
    assert not_found.returncode == 1 and not (tmp_path / "gpt-5").exists()
    error_lines = [line for line in not_found.stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, not_found.stderr
    assert "openai-community/gpt-5: no such model repo" in error_lines[0]
    assert "Traceback" not in not_found.stderr

    smoke = run_script("test_smoke.py", tmp_path / "gpt2" / "model.json",
                       tmp_path / "gpt2" / "model.safetensors",
                       "--temperature", "0", "--num-tokens", "8", "--device", "cpu")
    assert smoke.returncode == 0, smoke.stderr
    tokens = tokenizer.encode("Every effort moves you")
    with torch.no_grad():
        for _ in range(8):  # greedy decoding with transformers' forward pass
            tokens.append(theirs(torch.tensor([tokens])).logits[0, -1].argmax().item())
    prompt, continuation = smoke.stdout.removesuffix("\n").split(f"\n{SMOKE_SEPARATOR}\n")
    assert prompt + continuation == tokenizer.decode(tokens)

    tokens = torch.randint(0, 50257, (2 * 2 * 32 + 1,), generator=torch.Generator().manual_seed(0))
    (tmp_path / "data").mkdir()
    save_file({"tokens": tokens.to(torch.int32)}, tmp_path / "data" / "validation.safetensors")
    loss = run_script("test_loss.py", tmp_path, tmp_path / "gpt2" / "model.json",
                      tmp_path / "gpt2" / "model.safetensors", "--dataset", tmp_path / "data",
                      "--start-token", 0, "--batches", 2, "--batch-size", 2, "--device", "cpu",
                      "--dtype", "fp32", env={"HF_HUB_OFFLINE": "1"})
    assert loss.returncode == 0, loss.stderr
    with torch.no_grad():
        expected = theirs(tokens[:-1].view(4, 32), labels=None).logits
    expected = torch.nn.functional.cross_entropy(expected.flatten(0, 1), tokens[1:]).item()
    printed_loss = float(re.search(r"^Loss against our test dataset: ([0-9.]+)$", loss.stdout, re.M).group(1))
    assert printed_loss == pytest.approx(expected, abs=6e-4)

    _, _, exported_parameters = export(tmp_path / "gpt2" / "model.json", tmp_path / "gpt2" / "model.safetensors",
                                       tmp_path / "back")
    assert exported_parameters == theirs.num_parameters()
    assert load_exported(tmp_path / "back").config.tie_word_embeddings is True
    back = load_file(tmp_path / "back" / "model.safetensors")
    expected = {name: tensor for name, tensor in theirs.state_dict().items() if name != "lm_head.weight"}
    assert sorted(back) == sorted(expected)
    assert all(torch.equal(back[name], tensor) for name, tensor in expected.items())


# --- a checkpoint of a run, exported with tokenizer and model card, pushed to the Hub ---

@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A vocab-50257 model saved as a training run's checkpoint, exported through the
    `best` link and pushed to the stand-in Hub by export_hf.py in a subprocess."""
    root = tmp_path_factory.mktemp("published")
    run_dir = root / "runs" / "tiny-run"
    checkpoint = run_dir / "checkpoints" / "20251209Z143355-iteration-1234"
    model = our_model(FULL_VOCAB, seed=4)
    save_ours(checkpoint, FULL_VOCAB, model)
    (run_dir / "model.json").write_text(json.dumps(FULL_VOCAB, indent=2))
    train = {"dataset": "gpjt/fineweb-edu-gpt2-tokens", "min_train_tokens": -1, "start_train_token": 0,
             "start_val_token": 50000000, "minibatch_size": 6, "validation_interval": 100,
             "validation_batches": 100}
    (run_dir / "train.json").write_text(json.dumps(train, indent=2))
    (checkpoint / "meta.json").write_text(json.dumps({
        "train_loss": 3.98761, "val_loss": 4.01234, "global_step": 1234, "is_best": True,
        "tokens_seen": 7581696, "world_size": 8, "grad_norm": None, "seed": 67280421310721,
        "history": [{"global_step": 1234, "train_loss": 3.98761}],
    }))
    (run_dir / "checkpoints" / "best").symlink_to(checkpoint.name)

    with HubUploadServer(token=TOKEN) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(root / "hf-home")}
        result = run_script("export_hf.py", run_dir / "model.json",
                            run_dir / "checkpoints" / "best" / "model.safetensors", root / "export",
                            "--push-to-hub", "someone/tiny-gpt", "--private", env=env)
    return {"result": result, "hub": hub, "export": root / "export", "model": model,
            "train_json": (run_dir / "train.json").read_text()}


def test_push_uploads_every_exported_file_byte_for_byte(published):
    result, hub, export = published["result"], published["hub"], published["export"]
    assert result.returncode == 0, result.stderr
    assert "pushed to " + hub.url + "/someone/tiny-gpt/commit/" in result.stdout
    assert "untied output head" in result.stdout
    assert printed_parameters(result.stdout) == load_exported(export).num_parameters()
    assert TOKEN not in result.stdout + result.stderr
    assert hub.authorizations == {f"Bearer {TOKEN}"}
    repo = hub.repos["someone/tiny-gpt"]
    assert repo["private"] is True
    local = {path.name: path.read_bytes() for path in export.iterdir()}
    assert set(local) >= {"config.json", "generation_config.json", "model.safetensors", "README.md",
                          "vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json"}
    assert repo["files"] == local


def test_push_with_a_rejected_token_is_one_line(tmp_path):
    cfg = TINY
    config_path, weights_path = save_ours(tmp_path / "ours", cfg, our_model(cfg, seed=5))
    with HubUploadServer(token=TOKEN) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_wrong_token_abcdef", "HF_HOME": str(tmp_path / "home")}
        result = run_script("export_hf.py", config_path, weights_path, tmp_path / "export",
                            "--push-to-hub", "someone/tiny-gpt", env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("note: vocab_size 97"), result.stderr
    assert "someone/tiny-gpt" in lines[1] and "401" in lines[1], lines[1]
    assert "hf_wrong_token_abcdef" not in result.stdout + result.stderr
    assert hub.repos == {}
    assert (tmp_path / "export" / "model.safetensors").is_file()  # the export itself stands


def test_model_card_carries_the_checkpoint_facts(published):
    card = (published["export"] / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\nlibrary_name: transformers\n")
    exported = load_exported(published["export"])
    for fact in ("# someone/tiny-gpt", f"| parameters | {exported.num_parameters():,} |",
                 "| layers | 1 |", "| context length | 32 |", "| run | `tiny-run` |",
                 "| checkpoint | `20251209Z143355-iteration-1234` |",  # the real name, not `best`
                 "| global step | 1,234 |", "| tokens seen | 7,581,696 |",
                 "| training loss | 3.9876 |", "| validation loss | 4.0123 |",
                 "| world_size | 8 |", "| seed | 67,280,421,310,721 |", published["train_json"]):
        assert fact in card, fact
    assert "history" not in card and "grad_norm" not in card


# A varied text set: scripts and emoji, whitespace runs of every kind, code, and the
# end-of-text marker written literally, plus seeded random mixes of all of them.
TEXTS = [
    "Every effort moves you",
    "naïve café, Zürich — 東京 🙂🚀 Ünïcödé ß ø Ω ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 مرحبا שלום नमस्ते",
    "  leading and trailing spaces\t\n\n  ",
    "a  b   c    d\n\n\n\ne\t\t\tf \u00a0g\u3000h\r\ni\u2028j   ",
    "def f(x):\n    return {'k': [x ** 2, x // 3]}  # code\n\n\nclass A:\n\tpass\n",
    "hello<|endoftext|>world <|endoftext|> <|endoftext|><|endoftext|>x<|endo",
    "I'm you'll we'VE they'd 1234567890 3.14159 ¹²³ ½ ٣",
    "e\u0301 n\u0303 \u200b\u200d\ufeff zero-width and combining",
    "",
]
CHARACTERS = list("abcXYZ019 \t\n\r.,;:'\"!?()[]{}<>|-_=+*/\\@#$%^&~`") + [
    "é", "ß", "東", "京", "🙂", "🚀", "\u00a0", "\u3000", "\u0301", "ك", "<|endoftext|>", "'s",
    "  ", "\n\n"]


def varied_texts():
    generator = random.Random(0)
    mixes = ["".join(generator.choice(CHARACTERS) for _ in range(generator.randint(1, 40)))
             for _ in range(300)]
    return TEXTS + mixes


def test_exported_tokenizer_encodes_exactly_like_ours(published, tmp_path):
    export = published["export"]
    slow_path = tmp_path / "without-tokenizer-json"  # what transformers does with vocab.json + merges.txt
    shutil.copytree(export, slow_path)
    (slow_path / "tokenizer.json").unlink()
    texts = varied_texts()
    expected = [tokenizer.encode(text) for text in texts]
    for directory in (export, slow_path):
        theirs = transformers.AutoTokenizer.from_pretrained(directory)
        assert theirs.eos_token_id == tokenizer.END_OF_TEXT_ID
        assert theirs(texts)["input_ids"] == expected
        assert [theirs.decode(ids) for ids in expected] == texts
    generation = transformers.GenerationConfig.from_pretrained(export)
    assert generation.eos_token_id == tokenizer.END_OF_TEXT_ID


def test_exported_model_continues_text_like_ours(published):
    ours, theirs = published["model"], load_exported(published["export"])
    assert max_logit_difference(ours, theirs, 50257, 32) < 1e-4
    prompt = tokenizer.encode("Every effort moves you")
    with torch.no_grad():
        continued = theirs.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
    assert continued[0, len(prompt):].tolist() == generate(ours, [prompt], 10)[0]


def test_text_generation_pipeline_with_its_defaults_stays_within_the_context(published):
    """The pipeline's own default, 256 new tokens, would run past the 32 positions
    (an IndexError); generation_config.json's max_new_tokens keeps it inside."""
    generation = transformers.GenerationConfig.from_pretrained(published["export"])
    assert generation.max_new_tokens == 16  # half the context of 32
    torch.manual_seed(0)  # the pipeline samples by default
    generator = transformers.pipeline("text-generation", model=str(published["export"]))
    generated = generator("Every effort moves you")[0]["generated_text"]
    assert generated.startswith("Every effort moves you") and len(generated) > len("Every effort moves you")


# --- bad input: one line, and nothing written ---

@pytest.fixture
def tiny_checkpoint(tmp_path):
    return save_ours(tmp_path / "ours", TINY, our_model(TINY, seed=6))


def test_export_refuses_a_key_gpt2_cannot_express(tmp_path, tiny_checkpoint):
    config_path, weights_path = tiny_checkpoint
    config_path.write_text(json.dumps(dict(TINY, rope_theta=10000)))
    result = run_script("export_hf.py", config_path, weights_path, tmp_path / "export")
    assert_refused(result, 1, str(config_path), "'rope_theta'")
    assert not (tmp_path / "export").exists()


def test_export_refuses_a_mixture_of_experts_saying_what_to_do_instead(tmp_path):
    cfg = dict(TINY, moe={"num_experts": 4, "num_active_experts": 2})
    config_path, weights_path = save_ours(tmp_path / "moe", cfg, GPTModel(cfg), "ours")
    result = run_script("export_hf.py", config_path, weights_path, tmp_path / "export")
    assert_refused(result, 1, f"{config_path}: key 'moe': a mixture-of-experts model has no transformers "
                              "equivalent", "share model.json and model.safetensors as they are",
                   "test_loss.py")
    assert not (tmp_path / "export").exists()


def test_export_refuses_weights_that_do_not_match_model_json(tmp_path, tiny_checkpoint):
    config_path, weights_path = tiny_checkpoint
    config_path.write_text(json.dumps(dict(TINY, n_layers=3)))
    line = refusal(hf_gpt2.read_exportable_checkpoint, config_path, weights_path)
    assert str(weights_path) in line and "'trf_blocks.2." in line
    line = refusal(hf_gpt2.read_exportable_checkpoint, config_path, tmp_path / "missing.safetensors")
    assert "missing.safetensors" in line and "not found" in line


def test_export_usage_mistakes(tmp_path, tiny_checkpoint):
    config_path, weights_path = tiny_checkpoint
    result = run_script("export_hf.py", config_path, weights_path, tmp_path / "export", "--private")
    assert_refused(result, 2, "--private", "--push-to-hub")
    result = run_script("export_hf.py", config_path, weights_path, tmp_path / "export",
                        "--push-to-hub", "not a repo id!")
    assert_refused(result, 2, "--push-to-hub", "not a repo id!")
    assert not (tmp_path / "export").exists()  # refused before any work
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("keep me")
    result = run_script("export_hf.py", config_path, weights_path, tmp_path / "export")
    assert_refused(result, 1, "config.json", "--overwrite")
    assert (tmp_path / "export" / "config.json").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path / "export")) == ["config.json"]
    # --overwrite replacing it: test_the_export_script_replaces_an_earlier_export_with_overwrite


@pytest.fixture
def hf_checkpoint(tmp_path):
    directory = tmp_path / "hf"
    transformers_gpt2(seed=7, tied=False).save_pretrained(directory)
    return directory


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def assert_import_refused(tmp_path, source, exit_code, *fragments):
    """import_hf.py run as users run it, refusing: one line, nothing written."""
    result = run_script("import_hf.py", source, tmp_path / "out")
    assert_refused(result, exit_code, *fragments)
    assert not (tmp_path / "out").exists()
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".partial")]


def assert_refused_in_process(source, *fragments):
    """import_hf.py's reading of a local directory refusing it, with every fragment in its line."""
    line = refusal(import_local, source)
    for fragment in fragments:
        assert fragment in line, line


@pytest.mark.parametrize("key, value", [
    ("model_type", "llama"), ("activation_function", "relu"), ("layer_norm_epsilon", 1e-6),
    ("scale_attn_by_inverse_layer_idx", True), ("n_inner", 100),
])
def test_import_refuses_a_config_that_is_not_gpt2_shaped(hf_checkpoint, key, value):
    edit_json(hf_checkpoint / "config.json", **{key: value})
    assert_refused_in_process(hf_checkpoint, str(hf_checkpoint / "config.json"), f"'{key}'")


def test_import_refuses_missing_and_mis_shaped_tensors(tmp_path, hf_checkpoint):
    weights_path = hf_checkpoint / "model.safetensors"
    tensors = load_file(weights_path)
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, weights_path)
    # The script too: transformers' own report of what it didn't load, and its progress bar,
    # must not reach stderr.
    assert_import_refused(tmp_path, hf_checkpoint, 1, str(weights_path),
                          "'transformer.h.1.mlp.c_fc.weight' is missing")

    transformers_gpt2(seed=7, tied=False).save_pretrained(hf_checkpoint)
    edit_json(hf_checkpoint / "config.json", n_positions=32)
    assert_refused_in_process(hf_checkpoint, str(weights_path), "'transformer.wpe.weight'",
                              "(16, 32)", "(32, 32)")

    transformers_gpt2(seed=7, tied=False).save_pretrained(hf_checkpoint)
    tensors = load_file(weights_path)
    tensors["score.weight"] = torch.zeros(2, 32)  # e.g. a classification head
    save_file(tensors, weights_path)
    assert_refused_in_process(hf_checkpoint, str(weights_path), "unexpected tensor 'score.weight'")


class RunsCode:
    def __reduce__(self):
        return (exec, ("open('pwned', 'w').close()",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # from torch, about our bad pickle
def test_import_usage_mistakes(tmp_path, hf_checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_import_refused(tmp_path, tmp_path / "no" / "such" / "dir", 2, "no such directory")
    assert_import_refused(tmp_path, hf_checkpoint / "config.json", 2, "is a file")
    (hf_checkpoint / "model.safetensors").unlink()
    assert_refused_in_process(hf_checkpoint, "no model.safetensors or pytorch_model.bin")
    (hf_checkpoint / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle at all")
    assert_refused_in_process(hf_checkpoint, "pytorch_model.bin", "not a readable weights file")
    # weights_only: a pickle that would run code on loading is refused, not executed
    (hf_checkpoint / "pytorch_model.bin").write_bytes(pickle.dumps(RunsCode()))
    assert_refused_in_process(hf_checkpoint, "pytorch_model.bin", "not a readable weights file")
    assert not (tmp_path / "pwned").exists()

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.json").write_text("keep me")
    result = run_script("import_hf.py", hf_checkpoint, tmp_path / "out")
    assert_refused(result, 1, "model.json", "--overwrite")
    assert (tmp_path / "out" / "model.json").read_text() == "keep me"


def test_staged_output_appears_whole_with_the_usual_permissions(tmp_path):
    with safe_files.staged_output(tmp_path / "new") as staging:
        save_file({"x": torch.zeros(2)}, staging / "model.safetensors")
        assert not (tmp_path / "new").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "new" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert os.listdir(tmp_path / "new") == ["model.safetensors"]
    assert os.listdir(tmp_path) == ["new"]


def test_staged_output_leaves_nothing_behind_on_failure(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "model.json").write_text("old")
    for output_dir in (tmp_path / "new", existing):
        with pytest.raises(KeyboardInterrupt):
            with safe_files.staged_output(output_dir) as staging:
                (staging / "model.json").write_text("half")
                raise KeyboardInterrupt
    assert not (tmp_path / "new").exists()
    assert os.listdir(existing) == ["model.json"] and (existing / "model.json").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["existing"]


def test_staged_output_takes_the_umask_read_at_startup(tmp_path, monkeypatch):
    # safe_files reads the umask once, at import; staged_output uses that value.
    monkeypatch.setattr(safe_files, "_UMASK", 0o027)
    with safe_files.staged_output(tmp_path / "new") as staging:
        (staging / "model.json").write_text("{}")
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "new" / "model.json").stat().st_mode & 0o777 == 0o640


def test_output_under_a_file_is_one_line(tmp_path, hf_checkpoint, tiny_checkpoint):
    (tmp_path / "a-file").write_text("keep me")
    result = run_script("import_hf.py", hf_checkpoint, tmp_path / "a-file" / "out")
    assert_refused(result, 1, f"{tmp_path}/a-file is not a directory")
    config_path, weights_path = tiny_checkpoint
    result = run_script("export_hf.py", config_path, weights_path, tmp_path / "a-file" / "deeper" / "out")
    assert_refused(result, 1, f"{tmp_path}/a-file is not a directory")
    # Had it got past that check (a race), creating the directory is one line too.
    with pytest.raises(click.ClickException, match=f"^cannot create directory {tmp_path}/a-file: "
                                                   f"File exists$"):
        with safe_files.staged_output(tmp_path / "a-file" / "out"):
            pass
    assert (tmp_path / "a-file").read_text() == "keep me"
