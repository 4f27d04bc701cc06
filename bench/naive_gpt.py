"""The seed's model, written out formula by formula: the reference our fast model must match.

Used two ways: the tests check that gpt.GPTModel computes the same numbers and
exchanges state dicts with it (same parameter and buffer names, strict loading
both ways), and the benchmarks time it as the naive baseline. Nothing here is
fused or clever on purpose: explicit masked softmax attention using the stored
causal-mask buffer, hand-written GELU and LayerNorm, three separate Q/K/V matmuls;
the original's later weight tying and its mixture of experts as it wrote them (one
boolean mask per expert).
"""

import math

import torch
import torch.nn as nn


class NaiveLayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        variance = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(variance + self.eps) + self.shift


class NaiveGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class NaiveFeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["emb_dim"]
        self.layers = nn.Sequential(nn.Linear(d, 4 * d), NaiveGELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        return self.layers(x)


def masked_loop_mixture(router, experts, num_active_experts, x):
    """The original's mixture of experts, step by step: (output, (router_logits, expert_weights)).

    Top-k of the router logits, the rest set to -inf, softmax over all E (so the k
    chosen share the weight and the others get exactly 0); then one boolean mask per
    expert picks its tokens, the expert runs on them (on an empty tensor if none) and
    its weighted output is added back at the same places.
    """
    router_logits = router(x)
    top_logits, top_experts = torch.topk(router_logits, num_active_experts, dim=-1)
    kept_logits = torch.full_like(router_logits, -torch.inf).scatter(-1, top_experts, top_logits)
    expert_weights = torch.softmax(kept_logits, dim=-1)
    output = torch.zeros_like(x)
    for index, expert in enumerate(experts):
        mask = expert_weights[..., index] > 0
        output[mask] += expert(x[mask]) * expert_weights[mask, index].unsqueeze(1)
    return output, (router_logits, expert_weights)


class NaiveMixtureOfExperts(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_active_experts = cfg["moe"]["num_active_experts"]
        self.router = nn.Linear(cfg["emb_dim"], cfg["moe"]["num_experts"], bias=False)
        self.experts = nn.ModuleList(NaiveFeedForward(cfg) for _ in range(cfg["moe"]["num_experts"]))

    def forward(self, x):
        return masked_loop_mixture(self.router, self.experts, self.num_active_experts, x)[0]


class NaiveMultiHeadAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["emb_dim"]
        self.num_heads = cfg["n_heads"]
        self.head_dim = d // self.num_heads
        self.W_query = nn.Linear(d, d, bias=cfg["qkv_bias"])
        self.W_key = nn.Linear(d, d, bias=cfg["qkv_bias"])
        self.W_value = nn.Linear(d, d, bias=cfg["qkv_bias"])
        self.out_proj = nn.Linear(d, d)
        self.dropout = nn.Dropout(cfg["drop_rate"])
        ctx = cfg["context_length"]
        self.register_buffer("mask", torch.triu(torch.ones(ctx, ctx), diagonal=1))

    def forward(self, x):
        b, t, d = x.shape
        queries = self.W_query(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        keys = self.W_key(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        scores = queries @ keys.transpose(2, 3)
        scores = scores.masked_fill(self.mask.bool()[:t, :t], -torch.inf)
        weights = self.dropout(torch.softmax(scores / self.head_dim ** 0.5, dim=-1))
        context = (weights @ values).transpose(1, 2).contiguous().view(b, t, d)
        return self.out_proj(context)


class NaiveBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.att = NaiveMultiHeadAttention(cfg)
        self.ff = NaiveMixtureOfExperts(cfg) if "moe" in cfg else NaiveFeedForward(cfg)
        self.norm1 = NaiveLayerNorm(cfg["emb_dim"])
        self.norm2 = NaiveLayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class NaiveGPTModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[NaiveBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = NaiveLayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        if cfg.get("tie_weights", False):
            self.out_head.weight = self.tok_emb.weight

    def forward(self, in_idx):
        t = in_idx.shape[1]
        x = self.tok_emb(in_idx) + self.pos_emb(torch.arange(t, device=in_idx.device))
        x = self.trf_blocks(self.drop_emb(x))
        return self.out_head(self.final_norm(x))


def naive_generate(model, token_ids, max_new_tokens, context_length):
    """The seed's greedy loop: re-run the whole (cropped) context for every new token."""
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(token_ids[:, -context_length:])[:, -1]
        token_ids = torch.cat([token_ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return token_ids
