"""upload_model.py run as users run it, pushing to a stand-in of the Hub's upload API on
127.0.0.1 (tests/servers/hub_upload.py) through the real huggingface_hub client.

One upload of a tied checkpoint that sits in a training run: the repo is created public,
its files are byte for byte those export_hf.py's code writes for the same checkpoint
(model card included, with train.json's settings), and transformers loads them as a tied
GPT-2 with our logits. The mistakes are one line each, before anything reaches the Hub.
"""

import json

import pytest
import torch
import transformers  # the dev dependency group
from safetensors.torch import load_file, save_file

from support import hf_export
from support import hf_gpt2
from support import weights as weight_files
from support.config import load_train_config
from gpt import GPTModel
from helpers import TRAIN, one_line_error, run_script
from servers.hub_upload import HubUploadServer

# GPT-2's vocabulary (so that the tokenizer files are pushed), everything else tiny; tied.
CONFIG = dict(vocab_size=50257, emb_dim=16, context_length=32, n_heads=2, n_layers=1,
              drop_rate=0.1, qkv_bias=True, tie_weights=True)
TOKEN = "hf_stand_in_token_0123456789"
SETTINGS = {**TRAIN, "dataset": "gpjt/fineweb-gpt2-tokens", "minibatch_size": 6, "learning_rate": 0.0014,
            "weight_decay": 0.05}


def write_checkpoint(directory, cfg):
    """model.json and model.safetensors as our checkpoints write them (a tied matrix once)."""
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    directory.mkdir(parents=True)
    (directory / "model.json").write_text(json.dumps(cfg))
    tensors, aliases = weight_files.tensors_to_save(model.state_dict(), cfg)
    save_file(tensors, directory / "model.safetensors",
              metadata={"format": "pt", weight_files.CONFIG_METADATA_KEY: json.dumps(cfg), **aliases})
    return model


def run_upload(*arguments, hub, home):
    return run_script("upload_model.py", *arguments,
                      env={"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(home)})


@pytest.fixture(scope="module")
def uploaded(tmp_path_factory):
    root = tmp_path_factory.mktemp("upload")
    run_dir = root / "runs" / "tiny-run"
    checkpoint = run_dir / "checkpoints" / "20260101Z000000-iteration-40"
    model = write_checkpoint(checkpoint, CONFIG)
    (run_dir / "model.json").write_text(json.dumps(CONFIG))
    (run_dir / "train.json").write_text(json.dumps(SETTINGS))
    (checkpoint / "meta.json").write_text(json.dumps({"global_step": 40, "val_loss": 5.5, "is_best": True}))
    with HubUploadServer(token=TOKEN) as hub:
        result = run_upload(run_dir / "model.json", checkpoint / "model.safetensors", run_dir / "train.json",
                            "someone/tiny-tied", hub=hub, home=root / "home")
    return {"result": result, "hub": hub, "model": model, "run_dir": run_dir, "checkpoint": checkpoint,
            "root": root}


def test_upload_pushes_export_hf_files_to_a_new_public_repo(uploaded):
    result, hub = uploaded["result"], uploaded["hub"]
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    repo = hub.repos["someone/tiny-tied"]
    assert repo["private"] is False  # created public, as the original creates it
    assert repo["commits"] == ["Upload GPT-2 export from upload_model.py"]  # one commit
    assert TOKEN not in result.stdout

    # The files export_hf.py's code writes for the same checkpoint and name, byte for byte.
    run_dir, checkpoint = uploaded["run_dir"], uploaded["checkpoint"]
    expected_dir = uploaded["root"] / "expected"
    expected_dir.mkdir()
    cfg, weights = hf_gpt2.read_exportable_checkpoint(run_dir / "model.json", checkpoint / "model.safetensors")
    tied, _, parameters = hf_export.write_export(
        expected_dir, cfg, weights, "someone/tiny-tied", hf_export.checkpoint_facts(checkpoint / "model.safetensors"),
        hf_export.training_settings(load_train_config(run_dir / "train.json")))
    assert tied is True
    assert repo["files"] == {path.name: path.read_bytes() for path in expected_dir.iterdir()}
    assert {"tokenizer.json", "vocab.json", "merges.txt"} <= repo["files"].keys()
    assert result.stdout.startswith(f"pushed {checkpoint / 'model.safetensors'} to {hub.url}/someone/tiny-tied/commit/")
    assert result.stdout.endswith(f": GPT2LMHeadModel, {parameters:,} parameters, tied output head\n")

    # transformers loads what was pushed as a tied GPT-2 with our numbers.
    pushed = uploaded["root"] / "pushed"
    pushed.mkdir()
    for name, content in repo["files"].items():
        (pushed / name).write_bytes(content)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(pushed).eval()
    assert theirs.config.tie_word_embeddings is True
    assert "lm_head.weight" not in load_file(pushed / "model.safetensors")
    tokens = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (uploaded["model"](tokens) - theirs(tokens).logits).abs().max() < 1e-4


def test_model_card_shows_train_json_settings_and_the_checkpoint(uploaded):
    card = uploaded["hub"].repos["someone/tiny-tied"]["files"]["README.md"].decode()
    assert "datasets:\n- gpjt/fineweb-gpt2-tokens\n---\n" in card
    for row in ("| dataset | gpjt/fineweb-gpt2-tokens |", "| micro-batch size (sequences per GPU per step) | 6 |",
                "| gradient clipping (max norm) | 0.5 |", "| learning rate (peak) | 0.0014 |",
                "| learning-rate schedule | cosine |", "| weight decay | 0.05 |",
                "| output head | tied to the token embedding |", "| global step | 40 |",
                "| run | `tiny-run` |", "# someone/tiny-tied"):
        assert row in card, row


def test_mistakes_are_one_line_and_nothing_reaches_the_hub(tmp_path):
    write_checkpoint(tmp_path / "dense", {**CONFIG, "vocab_size": 97})
    moe_config = {**CONFIG, "tie_weights": False, "moe": {"num_experts": 4, "num_active_experts": 2}}
    write_checkpoint(tmp_path / "moe", moe_config)
    (tmp_path / "train.json").write_text(json.dumps(SETTINGS))
    (tmp_path / "bad-train.json").write_text(json.dumps({**SETTINGS, "learning_rate": "fast"}))
    dense = (tmp_path / "dense" / "model.json", tmp_path / "dense" / "model.safetensors")
    with HubUploadServer(token=TOKEN) as hub:
        def upload(*arguments):
            return run_upload(*arguments, hub=hub, home=tmp_path / "home")

        bad_name = upload(*dense, tmp_path / "train.json", "not a repo id!")
        bad_train = upload(*dense, tmp_path / "bad-train.json", "someone/x")
        moe = upload(tmp_path / "moe" / "model.json", tmp_path / "moe" / "model.safetensors",
                     tmp_path / "train.json", "someone/x")
        requests = list(hub.requests)
    assert bad_name.returncode == 2 and "Traceback" not in bad_name.stderr
    assert "Invalid value for HF_MODEL_NAME" in bad_name.stderr.splitlines()[-1]
    one_line_error(bad_train, f"{tmp_path / 'bad-train.json'}: key 'learning_rate' must be a number")
    one_line_error(moe, f"{tmp_path / 'moe' / 'model.json'}: key 'moe': a mixture-of-experts model has no "
                        "transformers equivalent", "share model.json and model.safetensors as they are", "test_loss.py")
    assert requests == [] and hub.repos == {}
