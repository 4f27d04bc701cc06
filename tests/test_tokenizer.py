import hashlib

import pytest

from support import tokenizer


@pytest.mark.parametrize("text, ids", [
    ("Every effort moves you", [6109, 3626, 6100, 345]),
    ("Hello, world", [15496, 11, 995]),
    ("<|endoftext|>", [50256]),
])
def test_known_ids(text, ids):
    assert tokenizer.encode(text) == ids


@pytest.mark.parametrize("text", [
    "naïve café, Zürich — 東京 🙂🚀",
    "  leading and trailing spaces\t\n\n  ",
    "def f(x):\n    return x ** 2  # code\n",
    "Ünïcödé ß ø Ω ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "",
])
def test_round_trip(text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_encoding_shape_matches_gpt2():
    encoding = tokenizer.get_tokenizer()
    assert encoding.n_vocab == 50257
    assert encoding.eot_token == 50256


def test_vendored_rank_file_hash():
    digest = hashlib.sha256(tokenizer.RANK_FILE.read_bytes()).hexdigest()
    assert digest == tokenizer.RANK_FILE_SHA256
