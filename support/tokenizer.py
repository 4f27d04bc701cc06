"""The GPT-2 tokenizer, built offline from the rank file shipped with this project.

tiktoken normally downloads its rank files on first use; we ship OpenAI's GPT-2
ranks (`r50k_base.tiktoken`) and check their hash, so nothing ever touches the
network and a corrupted copy is caught before it silently changes token ids.

The same ranks give GPT-2's vocab and merges lists, which export_hf.py writes out for
transformers.
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


# --- GPT-2's vocab and merges, as transformers' tokenizer files spell them ---

def byte_to_unicode():
    """GPT-2's reversible map of the 256 byte values to printable characters.

    Printable Latin-1 bytes stand for themselves; the rest (controls, space, ...) take
    the characters from U+0100 on, in byte order. vocab.json and merges.txt spell
    tokens this way, so every token is a string without spaces or control characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    next_free = 256
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(next_free)
            next_free += 1
    return mapping


def _merge_that_made(token, rank, ranks):
    """The two tokens whose merge produced `token`: BPE on its bytes with only older ranks."""
    parts = [bytes([byte]) for byte in token]
    while len(parts) > 2:
        best_rank, best_at = None, None
        for i in range(len(parts) - 1):
            pair_rank = ranks.get(parts[i] + parts[i + 1])
            if pair_rank is not None and pair_rank < rank and (best_rank is None or pair_rank < best_rank):
                best_rank, best_at = pair_rank, i
        if best_at is None:
            break
        parts[best_at:best_at + 2] = [parts[best_at] + parts[best_at + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {rank}) is not the merge of two older tokens")
    return parts


@functools.cache
def gpt2_vocab_and_merges():
    """(vocab, merges) in the byte-to-unicode spelling, rebuilt from the BPE ranks.

    The rank file lists each token with its rank, which is its id. Token 256+n was
    made by merge n, so the merges come out in order by splitting each token with BPE
    restricted to lower ranks.
    """
    ranks = get_tokenizer()._mergeable_ranks
    to_unicode = byte_to_unicode()

    def spell(token_bytes):
        return "".join(to_unicode[byte] for byte in token_bytes)

    vocab, merges = {}, []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        vocab[spell(token)] = rank
        if len(token) > 1:
            first, second = _merge_that_made(token, rank, ranks)
            merges.append((spell(first), spell(second)))
    vocab[END_OF_TEXT] = END_OF_TEXT_ID
    return vocab, merges
