# Copyright 2023-2025 Sebastian Raschka (the model's design, from "Build a Large Language
# Model (From Scratch)"); this implementation: the ddp-base-model-from-scratch authors.
# SPDX-License-Identifier: Apache-2.0
"""A GPT-2-style language model, with the seed's parameter names and the seed's math.

Same numbers as the textbook formulas (masked softmax attention, tanh-approximated
GELU, LayerNorm with biased variance), computed with PyTorch's fused kernels:
scaled_dot_product_attention (flash / memory-efficient attention where available),
F.layer_norm and F.gelu (on a CPU, attention with dropout goes block by block instead:
see blockwise_causal_attention). Decoding keeps a KV cache so each new token costs one
position of work instead of re-running the whole context; with targets, the loss is
computed without materialising the logits (LinearCrossEntropy).

The original's later model.json options: "tie_weights" (one matrix for the token
embedding and the output head) and "moe" (every block's FFN a mixture of experts,
MixtureOfExperts). forward(..., return_routing=True) also returns the routers'
outputs, for routing_statistics and load_balancing_loss.

This file imports nothing else from the project, so it can be copied into a notebook.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm(nn.Module):
    """Normalises over the last dimension (biased variance, eps 1e-5), then scale and shift."""

    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


class GELU(nn.Module):
    """GELU with GPT-2's tanh approximation, as one fused kernel."""

    def forward(self, x):
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        emb_dim = cfg["emb_dim"]
        # Indices 0 and 2 are part of the seed's parameter names (ff.layers.0 / ff.layers.2).
        self.layers = nn.Sequential(
            nn.Linear(emb_dim, 4 * emb_dim),
            GELU(),
            nn.Linear(4 * emb_dim, emb_dim),
        )

    def forward(self, x):
        return self.layers(x)


class MixtureOfExperts(nn.Module):
    """The original's sparse FFN: a router picks k of E dense FFNs ("experts") per token.

    Per token: router logits (E,), the top k kept, softmax over those k (the other
    weights exactly 0), and the output is the weighted sum of the k chosen experts'
    outputs. There is no capacity limit, router noise or shared expert, as in the original.

    The original runs each expert on a boolean-masked gather of its tokens, one mask per
    expert. Here the token-expert assignments are sorted by expert once, each expert runs
    on one contiguous slice, and the results go back to their tokens by the inverse
    permutation (see run_experts_on_their_tokens). Same math, same parameter names.
    """

    def __init__(self, cfg):
        super().__init__()
        self.num_experts = cfg["moe"]["num_experts"]
        self.num_active_experts = cfg["moe"]["num_active_experts"]
        # The original's messages: with k == 1 the softmax over one logit is always 1, so
        # the router would never get a gradient.
        if self.num_active_experts < 2:
            raise ValueError(f"Can't train with `num_active_experts` < 2 (got {self.num_active_experts})")
        if self.num_active_experts > self.num_experts:
            raise ValueError(f"self.num_active_experts={self.num_active_experts} is larger than "
                             f"self.num_experts={self.num_experts}")
        # Construction order is the original's, so the same seed draws the same weights.
        self.router = nn.Linear(cfg["emb_dim"], self.num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(cfg) for _ in range(self.num_experts))
        self.dispatch = eager_under_compile(run_experts_on_their_tokens)

    def forward(self, x):
        """(output shaped like x, (router_logits, expert_weights)), both (..., num_experts).

        expert_weights holds the k softmax weights at the chosen experts and 0 elsewhere,
        the original's `expert_weights`; both keep their graph, for a load-balancing loss.
        """
        router_logits = self.router(x)
        top_logits, top_experts = torch.topk(router_logits, self.num_active_experts, dim=-1)
        # Softmax over the k chosen logits alone equals the original's softmax over all E
        # with the others at -inf. fp32 whatever the autocast dtype, as autocast's softmax is.
        top_weights = torch.softmax(top_logits, dim=-1, dtype=torch.float32)
        expert_weights = torch.zeros_like(router_logits, dtype=torch.float32).scatter(-1, top_experts, top_weights)

        tokens = x.reshape(-1, x.shape[-1])
        # (k, tokens, ...): slot-major, so summing over the slots adds k contiguous slabs.
        slot_experts = top_experts.reshape(-1, self.num_active_experts).t()
        slot_weights = top_weights.reshape(-1, self.num_active_experts).t()
        chosen = self.dispatch(self.experts, tokens, slot_experts)
        output = (chosen * slot_weights[..., None]).sum(dim=0)
        return output.view_as(x).to(x.dtype), (router_logits, expert_weights)


def eager_under_compile(function):
    """`function` as torch.compile is to call it: eagerly, behind a graph break. Made when a
    MixtureOfExperts is built, not at import: torch.compiler.disable imports torch._dynamo,
    which would cost every script that imports this file a second and a half."""
    if _EAGER.get(function) is None:
        _EAGER[function] = torch.compiler.disable(function)
    return _EAGER[function]


_EAGER = {}


# Run eagerly under torch.compile (eager_under_compile): the slice sizes are data, and
# compiled code would recompile for each new set of them (sizes 0 and 1 are specialised).
def run_experts_on_their_tokens(experts, tokens, slot_experts):
    """The output of expert slot_experts[s, t] for token t: (k, tokens, emb_dim).

    The k * tokens assignments are sorted by expert, so expert j's tokens are one
    contiguous slice, gathered once; each expert runs on its slice and the inverse
    permutation puts the outputs back in (slot, token) order. The backward sums
    gradients in a fixed order (no atomics), so it repeats bit for bit.

    While training, an expert with no token still runs, on an empty slice: every
    parameter is in the graph and gets a gradient (zero), so DDP needs no
    find_unused_parameters. Without gradients (decoding: a few tokens, most experts
    idle) idle experts are skipped.

    The slice sizes are the one host synchronisation (`tolist`) per layer and forward,
    against the original's one per expert (each boolean-mask gather is one): the host
    waits for the router, then queues the experts' matmuls, which dwarf the wait.
    """
    k, num_tokens = slot_experts.shape
    assigned_expert = slot_experts.flatten()                      # assignment a = slot * tokens + token
    order = torch.argsort(assigned_expert, stable=True)           # assignments grouped by expert
    sizes = torch.bincount(assigned_expert, minlength=len(experts)).tolist()
    # The tokens k times over, then permuted: unlike gathering rows order % tokens, whose
    # backward adds k rows into each token's gradient (atomics on a GPU), this backward
    # is a permutation and a sum of the k copies, both in a fixed order.
    expert_inputs = tokens.repeat(k, 1)[order]
    every_expert = torch.is_grad_enabled()
    expert_outputs = torch.cat([expert(chunk) for expert, chunk, size in zip(experts, expert_inputs.split(sizes), sizes)
                                if size or every_expert])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return expert_outputs[inverse].view(k, num_tokens, -1)


def routing_statistics(routing):
    """The original's router statistics of one forward: (router_probabilities, expert_weights).

    routing: GPTModel's per-MoE-layer list of (router_logits, expert_weights), each
    (batch, tokens, E). Returns two detached (layers, E) tensors on the routing's
    device: the softmax over all E router logits averaged over the tokens, and the
    post-top-k weights averaged over the tokens (the original's moe_routing_weights and
    moe_routing_topk_weights entries; `.tolist()` gives its lists). No host sync here.
    """
    if not routing:
        return torch.zeros(0, 0), torch.zeros(0, 0)
    probabilities = torch.stack([torch.softmax(logits.detach().float(), dim=-1).flatten(0, -2).mean(0)
                                 for logits, _ in routing])
    weights = torch.stack([weights.detach().float().flatten(0, -2).mean(0) for _, weights in routing])
    return probabilities, weights


def load_balancing_loss(routing):
    """The Switch Transformer's auxiliary load-balancing loss (Fedus, Zoph and Shazeer,
    "Switch Transformers: Scaling to Trillion Parameter Models with Simple and Efficient
    Sparsity", 2021, eq. 4), averaged over the MoE layers:

        loss = E * sum_i f_i * P_i

    f_i: the fraction of the token-to-expert assignments that go to expert i (with k
    experts per token, the count divided by k * tokens, so the f_i sum to 1); P_i: the
    router probability of expert i (softmax over all E logits) averaged over the tokens.
    It is 1 when routing is uniform and grows as it concentrates. f is a count and has
    no gradient; the loss is differentiable through P, i.e. the router. A scalar tensor
    (0 for a dense model's empty routing); the training loop scales it by its own weight.
    """
    if not routing:
        return torch.zeros(())
    losses = []
    for router_logits, expert_weights in routing:
        num_experts = router_logits.shape[-1]
        assigned = (expert_weights.detach().flatten(0, -2) > 0).float()            # (tokens, E)
        fraction = assigned.sum(0) / assigned.sum()
        probability = torch.softmax(router_logits.float(), dim=-1).flatten(0, -2).mean(0)
        losses.append(num_experts * (fraction * probability).sum())
    return torch.stack(losses).mean()


class LayerKVCache:
    """Keys and values of one attention layer for the positions decoded so far."""

    def __init__(self, max_length):
        self.max_length = max_length
        self.length = 0
        self.keys = self.values = None

    def update(self, keys, values):
        """Store keys/values of shape (batch, heads, new_positions, head_dim); return all so far."""
        if self.keys is None:  # allocated on first use, in whatever dtype autocast produced
            batch, heads, _, head_dim = keys.shape
            shape = (batch, heads, self.max_length, head_dim)
            self.keys = keys.new_empty(shape)
            self.values = values.new_empty(shape)
        end = self.length + keys.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; asked for {end}")
        self.keys[:, :, self.length:end] = keys
        self.values[:, :, self.length:end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """One LayerKVCache per transformer block, plus the left padding of each sequence.

    Batched decoding left-pads prompts to one length. `pad_lengths[i]` is how many
    padding positions sequence i starts with: they are masked out of attention and
    don't count towards positions, so each sequence sees exactly what it would see
    decoded alone.
    """

    def __init__(self, n_layers, max_length, pad_lengths=None):
        self.layers = [LayerKVCache(max_length) for _ in range(n_layers)]
        self.max_length = max_length
        self.pad_lengths = pad_lengths

    @property
    def length(self):
        return self.layers[0].length


def blockwise_causal_attention(queries, keys, values, dropout_p, block_size=128):
    """Causal softmax attention with dropout on the weights, one block of query rows at a time.

    Where PyTorch has no fused attention kernel with dropout (on a CPU), its
    scaled_dot_product_attention builds the whole (tokens x tokens) score matrix, the
    masked upper half included, and spends as long drawing dropout masks for it as
    multiplying. Queries start..end can only see keys 0..end, so going block by block
    skips most of that half: about 45% fewer scores, softmaxes and mask draws at 1024
    tokens. The numbers are the seed's: softmax(q k^T / sqrt(head_dim)), dropout, times v.
    """
    num_tokens, head_dim = queries.shape[-2:]
    queries = queries * head_dim ** -0.5
    context_blocks = []
    for start in range(0, num_tokens, block_size):
        end = min(start + block_size, num_tokens)
        scores = queries[..., start:end, :] @ keys[..., :end, :].transpose(-2, -1)
        # Only the block's own square holds future keys: mask its upper triangle.
        future = torch.ones(end - start, end - start, dtype=torch.bool, device=scores.device).triu(1)
        scores[..., start:].masked_fill_(future, float("-inf"))
        # Softmax in fp32 whatever the autocast dtype, as SDPA does internally.
        weights = F.dropout(torch.softmax(scores, dim=-1, dtype=torch.float32), dropout_p).to(values.dtype)
        context_blocks.append(weights @ values[..., :end, :])
    return torch.cat(context_blocks, dim=-2)


class MultiHeadAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.dropout = dropout
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        # The seed saves this causal mask in every checkpoint and its GPTModel loads
        # strictly, so we keep it to stay interchangeable; attention itself uses
        # scaled_dot_product_attention's own causal masking and never reads it.
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x, layer_cache=None, attn_mask=None):
        batch, num_tokens, _ = x.shape

        def split_heads(projection):  # (b, t, d_out) -> (b, heads, t, head_dim)
            return projection.view(batch, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

        queries = split_heads(self.W_query(x))
        keys = split_heads(self.W_key(x))
        values = split_heads(self.W_value(x))
        if layer_cache is not None:
            keys, values = layer_cache.update(keys, values)

        dropout_p = self.dropout if self.training else 0.0
        if dropout_p > 0 and queries.device.type == "cpu" and attn_mask is None and layer_cache is None:
            context = blockwise_causal_attention(queries, keys, values, dropout_p)
        else:
            # Training and a first prefill are plain causal attention; a single decoded
            # token may attend to every cached position; anything else gets an explicit mask.
            context = F.scaled_dot_product_attention(
                queries, keys, values,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=attn_mask is None and num_tokens > 1,
            )  # scale defaults to 1/sqrt(head_dim), as in the seed
        context = context.transpose(1, 2).reshape(batch, num_tokens, self.d_out)
        return self.out_proj(context)


class TransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"],
            d_out=cfg["emb_dim"],
            context_length=cfg["context_length"],
            num_heads=cfg["n_heads"],
            dropout=cfg["drop_rate"],
            qkv_bias=cfg["qkv_bias"],
        )
        # As in the original, the key's presence makes every block a mixture of experts.
        self.ff = MixtureOfExperts(cfg) if "moe" in cfg else FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x, layer_cache=None, attn_mask=None):
        """(x, routing): routing is the MoE layer's (router_logits, expert_weights), else None."""
        x = x + self.drop_shortcut(self.att(self.norm1(x), layer_cache, attn_mask))
        routing = None
        if isinstance(self.ff, MixtureOfExperts):
            ff_output, routing = self.ff(self.norm2(x))
        else:
            ff_output = self.ff(self.norm2(x))
        return x + self.drop_shortcut(ff_output), routing


class GPTModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = dict(cfg)
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        if cfg.get("tie_weights", False):
            # One Parameter for both (the original's tying). The head was still built first,
            # so its draws happened and every other tensor is the untied model's.
            self.out_head.weight = self.tok_emb.weight

    @property
    def context_length(self):
        return self.pos_emb.num_embeddings

    def hidden_states(self, in_idx, kv_cache=None, return_routing=False):
        """Final-normed hidden states, (batch, tokens, emb_dim): everything but the output head.

        With return_routing, (hidden, routing): see forward.
        """
        batch, num_tokens = in_idx.shape
        start = 0 if kv_cache is None else kv_cache.length
        positions = torch.arange(start, start + num_tokens, device=in_idx.device)
        attn_mask = None
        if kv_cache is not None and (kv_cache.pad_lengths is not None or (start > 0 and num_tokens > 1)):
            positions, attn_mask = _decoding_positions_and_mask(
                kv_cache.pad_lengths, start, num_tokens, batch, in_idx.device
            )
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(positions))
        routing = []
        for index, block in enumerate(self.trf_blocks):
            layer_cache = None if kv_cache is None else kv_cache.layers[index]
            # Positional arguments: support/parallel.py's activation checkpointing wraps
            # each block's forward and passes only those on.
            x, block_routing = block(x, layer_cache, attn_mask)
            if block_routing is not None:
                routing.append(block_routing)
        hidden = self.final_norm(x)
        return (hidden, routing) if return_routing else hidden

    def forward(self, in_idx, kv_cache=None, targets=None, return_routing=False):
        """Logits (batch, tokens, vocab); or, given targets, the mean cross-entropy loss.

        The loss path never holds the whole batch's logits: see LinearCrossEntropy.
        Targets equal to -100 are ignored, as in F.cross_entropy.

        With return_routing, (logits or loss, routing): one (router_logits, expert_weights)
        pair per MoE block, each (batch, tokens, num_experts), with their graphs
        ([] for a dense model); see routing_statistics and load_balancing_loss. The
        original returns this pair for every call; we keep its logits-only API.
        """
        hidden, routing = self.hidden_states(in_idx, kv_cache, return_routing=True)
        if targets is None:
            output = self.out_head(hidden)
        else:
            output = LinearCrossEntropy.apply(hidden.flatten(0, 1), self.out_head.weight, targets.flatten())
        return (output, routing) if return_routing else output

    def new_kv_cache(self, pad_lengths=None):
        return KVCache(len(self.trf_blocks), self.context_length, pad_lengths)


# Logits per chunk of the fused loss: ~64 MB in fp32. A module constant, not a class
# attribute, because torch.compile can't read attributes of an autograd.Function's class.
LOSS_CHUNK_ELEMENTS = 2 ** 24


class LinearCrossEntropy(torch.autograd.Function):
    """mean(cross_entropy(hidden @ weight.T, targets)), a chunk of rows at a time.

    Equal to F.cross_entropy(out_head(hidden), targets), but the (tokens x 50,257)
    logits never exist at once, in any dtype. Each chunk's logits are made, turned
    into the loss and into the gradients for hidden and weight (softmax - one_hot,
    the cross-entropy gradient) right away, and dropped; backward only scales the
    stored gradients. That removes the biggest tensors of a training step and most
    of its memory traffic: the fp32 copy and log-softmax of all logits, their
    gradient's zero-fill and dtype copies. Under autocast the matmuls run in the
    autocast dtype and the softmax in fp32, as they would unfused.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        device_type = hidden.device.type
        compute_dtype = (torch.get_autocast_dtype(device_type)
                         if torch.is_autocast_enabled(device_type) else weight.dtype)
        compute_weight = weight.to(compute_dtype)
        counted = targets != -100
        safe_targets = torch.where(counted, targets, 0)[:, None]
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        chunk_rows = max(1, LOSS_CHUNK_ELEMENTS // weight.shape[0])
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            chunk_hidden = hidden[rows].to(compute_dtype)
            logits = (chunk_hidden @ compute_weight.t()).float()
            log_normaliser = torch.logsumexp(logits, dim=-1, keepdim=True)
            target_logits = logits.gather(1, safe_targets[rows])
            loss_sum += ((log_normaliser - target_logits).squeeze(1) * counted[rows]).sum()
            if not needs_grad:
                continue
            # d(loss_i)/d(logits_i) = softmax(logits_i) - one_hot(target_i); zero if ignored.
            grad_logits = logits.sub_(log_normaliser).exp_()
            grad_logits.scatter_add_(1, safe_targets[rows], -torch.ones_like(target_logits))
            grad_logits = grad_logits.mul_(counted[rows, None]).to(compute_dtype)
            grad_hidden[rows] = grad_logits @ compute_weight
            grad_weight += (grad_logits.t() @ chunk_hidden).float()
        count = counted.sum().clamp(min=1)
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight, count)
            ctx.weight_dtype = weight.dtype
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count
        return (grad_hidden * scale.to(grad_hidden.dtype),
                (grad_weight * scale).to(ctx.weight_dtype),
                None)


def _decoding_positions_and_mask(pad_lengths, start, num_tokens, batch, device):
    """Positions and attention mask for tokens [start, start+num_tokens) of a cached batch."""
    query_index = torch.arange(start, start + num_tokens, device=device)
    key_index = torch.arange(start + num_tokens, device=device)
    pad = (torch.zeros(batch, dtype=torch.long, device=device) if pad_lengths is None
           else pad_lengths.to(device))
    positions = (query_index[None, :] - pad[:, None]).clamp(min=0)             # (b, t)
    causal = key_index[None, None, :] <= query_index[None, :, None]             # (1, t, k)
    real_key = key_index[None, None, :] >= pad[:, None, None]                   # (b, 1, k)
    # A padding query may see itself, so its softmax has one entry and stays finite
    # (an all-masked row would give NaN, and NaN * 0 still poisons the next layer).
    itself = key_index[None, None, :] == query_index[None, :, None]
    attn_mask = (causal & real_key) | itself                                    # (b, t, k)
    return positions, attn_mask[:, None]                                        # heads broadcast


def next_token_from_logits(logits, temperature=0.0, top_k=None, generator=None):
    """The seed's sampling rule: keep the top_k logits, divide by temperature, sample.

    logits: (batch, vocab). temperature 0 is greedy decoding.
    """
    if temperature <= 0.0:
        return torch.argmax(logits, dim=-1)
    if top_k is not None:
        kth_largest = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probabilities = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probabilities, num_samples=1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=0.0, top_k=None, eos_id=None,
             generator=None):
    """Continue each prompt (a list of token ids) by up to max_new_tokens tokens.

    Returns one list of new token ids per prompt, stopping a sequence at eos_id (not
    included). Prompts are left-padded into one batch and decoded with a KV cache;
    the result equals decoding each prompt alone. As in the seed, the model only ever
    sees the last context_length tokens: once a sequence outgrows the cache, the
    window is cropped and re-encoded (positions shift, so cached keys can't be reused).
    """
    if not prompts or any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("generate needs at least one prompt, and no empty prompts")
    device = next(model.parameters()).device
    context_length = model.context_length
    sequences = [list(prompt) for prompt in prompts]
    new_tokens = [[] for _ in prompts]
    finished = [False] * len(prompts)
    kv_cache, last_tokens = None, None

    for _ in range(max_new_tokens):
        if kv_cache is None or kv_cache.length >= context_length:
            windows = [sequence[-context_length:] for sequence in sequences]
            longest = max(len(window) for window in windows)
            pad_lengths = torch.tensor([longest - len(window) for window in windows])
            padded = [[0] * (longest - len(window)) + window for window in windows]
            kv_cache = model.new_kv_cache(pad_lengths if pad_lengths.any() else None)
            logits = model(torch.tensor(padded, device=device), kv_cache)[:, -1]
        else:
            logits = model(last_tokens[:, None], kv_cache)[:, -1]
        last_tokens = next_token_from_logits(logits, temperature, top_k, generator)

        for index, token in enumerate(last_tokens.tolist()):
            if finished[index]:
                continue
            if eos_id is not None and token == eos_id:
                finished[index] = True
                continue
            new_tokens[index].append(token)
            sequences[index].append(token)
        if all(finished):
            break
    return new_tokens
