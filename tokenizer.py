"""The GPT-2 tokenizer, built offline from the rank file shipped with this project.

tiktoken normally downloads its rank files on first use; we ship OpenAI's GPT-2
ranks (`r50k_base.tiktoken`) and check their hash, so nothing ever touches the
network and a corrupted copy is caught before it silently changes token ids.
"""

import functools
import hashlib
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

RANK_FILE = Path(__file__).resolve().parent / "r50k_base.tiktoken"
RANK_FILE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256
VOCAB_SIZE = 50257

try:  # tiktoken's own copy of the GPT-2 split pattern, when it exposes one
    from tiktoken_ext.openai_public import r50k_pat_str as SPLIT_PATTERN
except ImportError:  # older tiktoken: the same pattern without possessive quantifiers
    SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TokenizerFileError(RuntimeError):
    pass


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken's "gpt2" encoding (identical to "r50k_base"), loaded from our copy."""
    if not RANK_FILE.is_file():
        raise TokenizerFileError(f"{RANK_FILE}: GPT-2 rank file is missing")
    digest = hashlib.sha256(RANK_FILE.read_bytes()).hexdigest()
    if digest != RANK_FILE_SHA256:
        raise TokenizerFileError(
            f"{RANK_FILE}: sha256 is {digest}, expected {RANK_FILE_SHA256}; the file is corrupt"
        )
    # load_tiktoken_bpe with a local path reads the file and never downloads.
    ranks = load_tiktoken_bpe(str(RANK_FILE))
    encoding = tiktoken.Encoding(
        name="gpt2",
        pat_str=SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={END_OF_TEXT: END_OF_TEXT_ID},
    )
    assert encoding.n_vocab == VOCAB_SIZE
    return encoding


def encode(text: str) -> list[int]:
    """Encode as the seed's scripts do: a literal "<|endoftext|>" becomes token 50256."""
    return get_tokenizer().encode(text, allowed_special={END_OF_TEXT})


def decode(token_ids) -> str:
    return get_tokenizer().decode(list(token_ids))
