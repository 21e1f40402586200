"""FastV: inner visual-token pruning inside LLaVA's LLM prefill, as exportable prefill / decode parts, and its eager
reference.

    result = export_llava(model, "out/llava", "cls-topk:1.0", inner="fastv@1:0.5")   # no outer pruning, FastV
    report = verify_llava(result)              # ORT greedy ids == eager FastV reference, kept image tokens, logits

Spec: `fastv@L:R`, optionally with parameters `fastv(debias=true,uniform=0.5,merge=true)@L:R` (see below). L is the
0-based decoder layer after which image tokens are dropped (or merged) (0 <= L <= num_layers - 2); R is the number of
image tokens kept, a ratio of the N image tokens the prompt carries (`0.5`, `1.0`) or a count (`8`), 1 <= R <= N.

Prefill (`FastvPrefill`, lm_prefill.onnx):
    inputs_embeds (B, T, H), attention_mask (B, T), position_ids (B, T), image_positions (B, N) int64 (the sequence
    indices of the N image tokens of each row, ascending)
    -> logits (B, V), present.i.key/value (B, kv, T, D) for layers 0..L and (B, kv, T', D) for layers L+1..,
       keep_idx (B, T') int64 (the prompt positions kept, ascending), image_keep_idx (B, R) int64 (the kept image
       tokens as ordinals 0..N-1 among the image tokens, ascending), with T' = T - (N - R).
    Layers 0..L run over all T tokens. Score: the softmax row of the LAST prompt position at layer L (q of that
    position from layer L's input, keys = layer L's cached keys after RoPE, padding keys masked), head mean; the
    fused SDPA gives no probabilities, so this one row is recomputed. The R image tokens with the highest score are
    kept (TopK -> sort: original order; with uniform=S the U fixed ordinals first, see below), every text token is
    kept; hidden states, position ids and the attention mask are gathered at keep_idx for layers L+1... Kept
    tokens keep their ORIGINAL position ids (RoPE).
Decode (`FastvDecode`, lm_decode.onnx):
    input_ids (B, 1), attention_mask (B, P + 1), attention_mask_pruned (B, P' + 1), position_ids (B, 1),
    past.i.key/value (B, kv, P, D) for layers 0..L, (B, kv, P', D) for layers L+1..
    -> logits (B, V), present.i.* one longer. Each layer attends over its own cache with its own key mask, so
    batch > 1 and left padding are exact (attention_mask_pruned = attention_mask gathered at keep_idx, then one 1
    per generated token). Decode positions continue at the original prompt length (position_ids[:, -1] + 1).
Masks are built by hand (causal & valid key, plus the diagonal so a padding row never has an empty softmax).
Prompts must be left-padded and must end with a text token (the scoring position).

debias (the "attention debiasing" variant): score = FastV score - bias, bias (N,) a per-image-position mean score
(`calibrate_fastv_bias` averages the FastV score over calibration prompts/images; Qwen2-VL:
qwen2_vl_adapter.calibrate_qwen2_fastv_bias); it removes the positional preference of the last query (RoPE recency)
before TopK. Pure arithmetic on the score; the bias is a constant (`export-vlm --inner-bias FILE.npy`: np.save it).

uniform=S (FEATHER, Endo et al. 2025, "Feather the Throttle"; 0 <= S < 1, default 0 = plain FastV): of the R kept
image tokens, U = round(S * R) (Python round) are fixed, evenly spaced image ordinals round(linspace(0, N - 1, U))
(graph_passes/methods/position_scores.uniform_scores), the other R - U are the highest-score image tokens among the
rest: FastV's criterion plus uniform spatial coverage under the same total budget R. Static: score =
Where(uniform_hit, +inf, score) before the same TopK, exact because every (debiased) score is finite, so TopK takes
all U fixed ordinals and then the best R - U others. Combines with debias (the bias is subtracted first).

merge=true (HoliTom's inner-LLM merging, Shao et al. 2025, github.com/cokeshao/HoliTom holitom/modeling_qwen2.py):
the same selection (with debias / uniform=S if given), but each of the N - R other image tokens is MERGED into a kept
one instead of dropped, on the hidden states h = layer L's output (the input of layer L + 1). HoliTom's rule: with
top = the kept image positions and non = the others (ascending), sim = cosine(h[non], h[top]) once, target(i) =
argmax over top (ties: the first, i.e. the earliest kept position), then for i in non ascending:
h[target(i)] = (h[target(i)] + h[i]) / 2 in place. Unrolled, a kept token t with members i_1 < ... < i_m ends as
h_t / 2^m + sum_j h_{i_j} / 2^(m-j+1). `merge_into_kept` writes that in closed form (no scatter, static shapes):
the (N, R) one-hot assignment A from comparisons (first maximum: ReduceMax, then ReduceMin over the indices at the
maximum, not ArgMax, whose tie order TensorRT's TopK-based ArgMax does not promise); the members after each one,
U @ A with U the strict upper triangle (N, N); the (R, N) weights W = (A * 2^-(1 + after))^T + onehot(top) * 2^-m
(Pow of a float count: ONNX Pow, opset 15 = the latest <= 18, which TensorRT's parser supports; no Where); one MatMul
W @ h_img; the kept rows are put back with Gather + Where. Then only text + top tokens are kept as without merge (their
original position ids). HoliTom = outer `holitom` (video) + inner `fastv(merge=true)@L:R`; HoliTom's layer k (the
layer that sees the merged tokens) is our L = k - 1. Note: HoliTom orders top by TopK score, so its ties go to the
highest-scored kept token; ties need identical cosines, i.e. parallel hidden states.

The eager reference (`reference_fastv_generate`) is independent of the parts: HF's own eager attention
probabilities (output_attentions) give the score, the image positions come from input_ids, uniform=S is a TopK over
the non-uniform ordinals only (united with the fixed ones, no +inf), merge=true is
`reference_merge`, HoliTom's sequential loop written literally (independent of the closed form), and every greedy
step re-runs HF's decoder layers by hand over the whole sequence (no cache): layers 0..L over every token, layers
L+1.. over the kept prompt tokens plus the generated ones.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.export import Dim
from transformers.cache_utils import DynamicCache

from tokensieve.errors import ConfigError
from tokensieve.exporter.vlm.export_part import PartSpec
from tokensieve.exporter.vlm.llava import LlavaLayout
from tokensieve.exporter.vlm.lm_parts import EXAMPLE_BATCH, _cache_from, _flatten, kv_names
from tokensieve.graph_passes.methods.position_scores import uniform_scores
from tokensieve.recipe import Budget, parse_stage_text

_BATCH = Dim("batch", min=1, max=4096)
_SEQ = Dim.DYNAMIC
@dataclass(frozen=True)
class FastvSpec:
    """The static FastV stage: drop N - R image tokens after decoder layer `layer`."""

    layer: int                 # L, 0-based
    keep: int                  # R image tokens kept
    num_image_tokens: int      # N image tokens in every prompt
    num_layers: int
    bias: tuple[float, ...] | None = None   # debias: (N,) subtracted from the score
    uniform: float = 0.0       # FEATHER: share S of the R kept tokens that are fixed evenly spaced ordinals
    merge: bool = False        # HoliTom: merge each dropped image token into its most similar kept one

    @property
    def dropped(self) -> int:
        return self.num_image_tokens - self.keep

    @property
    def num_uniform(self) -> int:
        """U = round(S * R): kept image tokens fixed at evenly spaced ordinals."""
        return min(self.keep, int(round(self.uniform * self.keep)))

    @property
    def uniform_ordinals(self) -> tuple[int, ...]:
        """The U fixed image ordinals, ascending: round(linspace(0, N - 1, U)), as uniform_scores picks them."""
        hit = uniform_scores(torch.zeros(1, self.num_image_tokens), self.num_uniform, num_prefix_tokens=0)[0]
        return tuple(int(i) for i in torch.nonzero(hit > 0).flatten())

    def shorthand(self) -> str:
        params = ["debias=true"] * (self.bias is not None) + [f"uniform={self.uniform:g}"] * (self.uniform > 0) \
            + ["merge=true"] * self.merge
        return f"fastv{'(' + ','.join(params) + ')' if params else ''}@{self.layer}:{self.keep}"

    def to_dict(self) -> dict:
        return {"method": "fastv", "layer": self.layer, "keep": self.keep, "num_image_tokens": self.num_image_tokens,
                "debias": self.bias is not None, "uniform": self.uniform, "num_uniform": self.num_uniform,
                "merge": self.merge}


_PARAMS = "debias=true|false, uniform=S (0 <= S < 1) and merge=true|false"


INNER_EXAMPLE = "fastv@LAYER:KEEP, e.g. fastv@1:0.5 (ratio of the image tokens) or fastv@1:8 (count)"


def _split(text: str) -> tuple[bool, float, bool, int, Budget]:
    """`fastv(debias=true,uniform=0.5,merge=true)@1:0.5` -> (debias, uniform share, merge, layer, keep budget);
    one-line ConfigError. The grammar is the recipes' (tokensieve.recipe.parse_stage_text)."""
    st = parse_stage_text(text, INNER_EXAMPLE)
    if st.method != "fastv" or st.places is None or len(st.places) != 1:
        raise ConfigError(f"Cannot parse inner pruning {str(text).strip()!r}; write {INNER_EXAMPLE}")
    params = dict(st.raw_params)
    for item in params:
        if item not in ("debias", "uniform", "merge"):
            raise ConfigError(f"fastv parameters are {_PARAMS}; got {item!r}")
    flags = {}
    for key in ("debias", "merge"):
        flags[key] = params.get(key, "false").lower()
        if flags[key] not in ("true", "false"):
            raise ConfigError(f"fastv {key}={params[key]!r} must be true or false")
    try:
        uniform = float(params.get("uniform", "0"))
    except ValueError:
        raise ConfigError(f"fastv uniform={params['uniform']!r} is not a number; use a share 0 <= S < 1, e.g. "
                          "uniform=0.5") from None
    if not 0.0 <= uniform < 1.0:
        raise ConfigError(f"fastv uniform={params['uniform']} is out of range; use a share 0 <= S < 1 of the kept "
                          "image tokens (0 = plain FastV)")
    return flags["debias"] == "true", uniform, flags["merge"] == "true", st.places[0], st.keep


def split_fastv(text: str) -> tuple[bool, int, str]:
    """Syntax only (no model needed): `fastv(debias=true)@1:0.5` -> (debias, layer, keep text); ConfigError (every
    parameter is checked, uniform=S too)."""
    debias, _, _, layer, budget = _split(text)
    return debias, layer, str(budget)


def parse_fastv(text: str, num_layers: int, num_image_tokens: int, bias=None) -> FastvSpec:
    """`fastv@1:0.5` / `fastv@1:8` / `fastv(debias=true,uniform=0.5,merge=true)@1:8` -> FastvSpec; one-line
    ConfigError otherwise."""
    debias, uniform, merge, layer, budget = _split(text)
    if not 0 <= layer <= num_layers - 2:
        raise ConfigError(f"fastv layer {layer} is out of range; the language model has {num_layers} layers, prune "
                          f"after layer 0..{num_layers - 2} (later layers must remain to see fewer tokens)")
    n = num_image_tokens
    keep = budget.resolve(n)
    if not 1 <= keep <= n:
        raise ConfigError(f"fastv keep={keep} is out of range; the prompt carries {n} image tokens, keep 1..{n}")
    if debias and bias is None:
        raise ConfigError("fastv(debias=true) needs the per-position bias: pass inner_bias= (see "
                          "tokensieve.exporter.vlm.fastv.calibrate_fastv_bias; Qwen2-VL: "
                          "tokensieve.exporter.vlm.qwen2_vl_adapter.calibrate_qwen2_fastv_bias)")
    if bias is not None:
        bias = np.asarray(bias, dtype=np.float64).reshape(-1)
        # float32-finite: the graph subtracts it in float32, and uniform=S relies on every score being finite
        if bias.shape != (n,) or not (np.abs(bias) < np.finfo(np.float32).max).all():
            raise ConfigError(f"inner_bias must be {n} finite floats (one per image token), got shape {bias.shape}")
        bias = tuple(float(v) for v in bias)
    return FastvSpec(layer, keep, n, num_layers, bias, uniform, merge)


# --------------------------------------------------------------------------- exported parts


def _masks(valid: Tensor) -> Tensor:
    """(B, S) bool key validity -> (B, 1, S, S) bool: causal & (valid key or the diagonal)."""
    s = valid.shape[1]
    ar = torch.arange(s, device=valid.device)
    causal = ar[:, None] >= ar[None, :]
    return ((causal[None] & valid[:, None, :]) | torch.eye(s, dtype=torch.bool, device=valid.device)[None])[:, None]


def _rope_query(attn: nn.Module, h_last: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """q (B, heads, 1, D) of layer `attn` for the normed hidden state of one position, after RoPE (and after the
    per-head q_norm first where the attention has one: Gemma 3, Qwen3, as their forward applies it before RoPE)."""
    q = attn.q_proj(h_last).view(*h_last.shape[:-1], -1, attn.head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    q = q.transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = q.shape[-1] // 2
    return q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin


def fastv_scores(attn: nn.Module, h_in_normed_last: Tensor, keys: Tensor, cos_last: Tensor, sin_last: Tensor,
                 valid: Tensor) -> Tensor:
    """(B, T) float32: the head-mean softmax row of the last position over every key (padding keys get 0)."""
    q = _rope_query(attn, h_in_normed_last, cos_last, sin_last)
    groups = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(groups, dim=1) if groups > 1 else keys
    logits = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) * attn.scaling  # (B, heads, T)
    logits = logits.masked_fill(~valid[:, None, :], torch.finfo(torch.float32).min)
    return logits.softmax(dim=-1).mean(dim=1)


def selection_buffers(spec: FastvSpec) -> tuple[Tensor, Tensor]:
    """(bias (N,) float32, zeros without debias; uniform_hit (N,) bool, True at the U fixed ordinals): the constants
    select_image_tokens reads."""
    bias = torch.tensor(spec.bias if spec.bias is not None else [0.0] * spec.num_image_tokens, dtype=torch.float32)
    hit = torch.zeros(spec.num_image_tokens, dtype=torch.bool)
    hit[list(spec.uniform_ordinals)] = True
    return bias, hit


def select_image_tokens(scores: Tensor, image_positions: Tensor, spec: FastvSpec, bias: Tensor,
                        uniform_hit: Tensor) -> tuple[Tensor, Tensor]:
    """FastV's static selection: scores (B, T) of every position, image_positions (B, N) ascending -> keep_idx (B, T')
    (every text position + the R kept image positions, ascending), image_keep (B, R) (kept image ordinals,
    ascending)."""
    image_scores = scores.gather(1, image_positions)
    if spec.bias is not None:
        image_scores = image_scores - bias
    if spec.num_uniform:  # FEATHER: every finite score < +inf, so TopK takes the U fixed ordinals first
        image_scores = torch.where(uniform_hit, torch.inf, image_scores)
    image_keep = image_scores.topk(spec.keep, dim=-1).indices.sort(dim=-1).values   # (B, R) ordinals
    kept_pos = image_positions.gather(1, image_keep)                                # (B, R) sequence idx
    t = scores.shape[1]
    ar = torch.arange(t, device=scores.device)
    dropped = (image_positions[:, :, None] == ar).any(1) & ~(kept_pos[:, :, None] == ar).any(1)
    # kept positions sort first (in order), dropped ones after: the smallest T' keys are keep_idx, ascending
    keep_idx = torch.topk(ar + dropped.long() * t, t - spec.dropped, dim=-1, largest=False).indices
    return keep_idx, image_keep


def merge_into_kept(h: Tensor, image_positions: Tensor, image_keep: Tensor) -> Tensor:
    """HoliTom's merge in closed form: h (B, T, C), image_positions (B, N) ascending, image_keep (B, R) ascending
    ordinals -> h with each kept image row replaced by its merge (see the module docstring); the other rows unchanged
    (the dropped ones are gathered away next). Comparisons, two small MatMuls and Pow: no scatter, static shapes."""
    n, r, c = image_positions.shape[1], image_keep.shape[1], h.shape[-1]
    ar_n, ar_r = torch.arange(n, device=h.device), torch.arange(r, device=h.device)
    x = h.gather(1, image_positions[..., None].expand(-1, -1, c)).float()          # (B, N, C) the image tokens
    top = image_keep[:, :, None] == ar_n                                             # (B, R, N) one-hot of the kept
    norm = x.norm(dim=-1).clamp_min(1e-12)                                           # (B, N); 0 vector: cos 0
    top_x, top_norm = x.gather(1, image_keep[..., None].expand(-1, -1, c)), norm.gather(1, image_keep)
    sim = (x @ top_x.transpose(1, 2)) / (norm[:, :, None] * top_norm[:, None, :])    # (B, N, R) cosine
    # the FIRST maximum (the earliest kept position), from comparisons only: ArgMax's tie order is not portable
    best = sim.amax(dim=-1, keepdim=True)
    target = (ar_r + r * (sim < best).long()).amin(dim=-1)                           # (B, N) in 0..R-1
    member = ((target[..., None] == ar_r) & ~top.any(1)[..., None]).float()         # (B, N, R) A: non i -> target
    later = (ar_n[None, :] > ar_n[:, None]).float()                                  # (N, N) U[j, j'] = j' > j
    after = later @ member                                                           # (B, N, R) members after j
    size = member.sum(dim=1)                                                         # (B, R) m
    weight = (member * torch.pow(2.0, -(after + 1.0))).transpose(1, 2) \
        + top.float() * torch.pow(2.0, -size)[..., None]                             # (B, R, N) W
    merged = (weight @ x).to(h.dtype)                                                # (B, R, C)
    kept_pos = image_positions.gather(1, image_keep)                                 # (B, R) ascending
    ar_t = torch.arange(h.shape[1], device=h.device)
    is_kept = (kept_pos[:, :, None] == ar_t).any(1)                                  # (B, T)
    rank = (kept_pos[:, :, None] < ar_t).sum(1).clamp_max(r - 1)                     # (B, T) row of merged
    return torch.where(is_kept[..., None], merged.gather(1, rank[..., None].expand(-1, -1, c)), h)


def gather_positions_1d(positions: Tensor, cols: Tensor) -> Tensor:
    """1-D position ids (B, T) at the kept columns (B, T') (LLaVA; M-RoPE families pass their own gather)."""
    return positions.gather(1, cols)


class FastvLayers(nn.Module):
    """The decoder stack of a VLM's language model with FastV after layer `spec.layer`: the prefill loop (the score
    row, the selection, merge=true, the kept-column gather of hidden states, positions and key validity) and the
    decode loop (each layer over its own cache), written once for every family. `gather_positions(pos, keep_idx)`
    is the family's position hook (1-D ids, or M-RoPE's (3, B, T))."""

    def __init__(self, model: nn.Module, spec: FastvSpec, gather_positions=gather_positions_1d):
        super().__init__()
        lm = model.model.language_model
        self.layers, self.norm, self.rotary_emb, self.lm_head = lm.layers, lm.norm, lm.rotary_emb, model.lm_head
        self.spec, self.gather_positions = spec, gather_positions

    def selection(self) -> None:
        """Register the selection constants (debias bias, FEATHER's fixed ordinals): prefill parts only."""
        bias, hit = selection_buffers(self.spec)
        self.register_buffer("bias", bias, persistent=False)
        self.register_buffer("uniform_hit", hit, persistent=False)

    def prefill(self, h: Tensor, pos: Tensor, valid: Tensor, image_positions: Tensor):
        """h (B, T, C), pos (the family's ids over T), valid (B, T) bool, image_positions (B, N) ascending ->
        (logits (B, V), flat caches (layers 0..L: T, after: T'), keep_idx (B, T'), image_keep (B, R))."""
        spec, cache = self.spec, DynamicCache()
        mask, pe = _masks(valid), self.rotary_emb(h, pos)
        for i, layer in enumerate(self.layers):
            h_in = h
            h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pos, past_key_values=cache,
                      use_cache=True)
            if i != spec.layer:
                continue
            cos, sin = pe  # (B, T, D): the family's rotary (M-RoPE: its sections recomposed), as the keys were rotated
            scores = fastv_scores(layer.self_attn, layer.input_layernorm(h_in[:, -1:]), cache.layers[i].keys,
                                  cos[:, -1:], sin[:, -1:], valid)
            keep_idx, image_keep = select_image_tokens(scores, image_positions, spec, self.bias, self.uniform_hit)
            if spec.merge:  # HoliTom: the dropped image tokens merge into the kept ones first
                h = merge_into_kept(h, image_positions, image_keep)
            h = h.gather(1, keep_idx[..., None].expand(-1, -1, h.shape[-1]))
            pos, valid = self.gather_positions(pos, keep_idx), valid.gather(1, keep_idx)  # original positions
            mask, pe = _masks(valid), self.rotary_emb(h, pos)
        return self.lm_head(self.norm(h[:, -1])), _flatten(cache), keep_idx, image_keep

    def decode(self, h: Tensor, pos: Tensor, past: tuple[Tensor, ...], full_mask, pruned_mask):
        """One step over caches of two lengths: layers 0..L attend with `full_mask`, the later ones with
        `pruned_mask` (None: one query over its own cache, nothing to mask) -> (logits, *caches)."""
        cache = _cache_from(past)
        pe = self.rotary_emb(h, pos)
        for i, layer in enumerate(self.layers):
            h = layer(h, attention_mask=full_mask if i <= self.spec.layer else pruned_mask, position_embeddings=pe,
                      position_ids=pos, past_key_values=cache, use_cache=True)
        return (self.lm_head(self.norm(h[:, -1])), *_flatten(cache))


class FastvPrefill(FastvLayers):
    """LLaVA: (inputs_embeds, attention_mask, position_ids (B, T), image_positions (B, N)) -> (logits, caches...,
    keep_idx (B, T'), image_keep_idx (B, R))."""

    def __init__(self, model: nn.Module, spec: FastvSpec, gather_positions=gather_positions_1d):
        super().__init__(model, spec, gather_positions)
        self.selection()

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor,
                image_positions: Tensor) -> tuple[Tensor, ...]:
        logits, caches, keep_idx, image_keep = self.prefill(inputs_embeds, position_ids, attention_mask.bool(),
                                                            image_positions)
        return (logits, *caches, keep_idx, image_keep)


class FastvDecode(FastvLayers):
    """LLaVA: one step with the full-length mask for layers 0..L and `attention_mask_pruned` for the rest."""

    def __init__(self, model: nn.Module, spec: FastvSpec):
        super().__init__(model, spec)
        self.embed_tokens = model.model.language_model.embed_tokens

    def forward(self, input_ids: Tensor, attention_mask: Tensor, attention_mask_pruned: Tensor, position_ids: Tensor,
                *past: Tensor) -> tuple[Tensor, ...]:
        full, pruned = attention_mask.bool()[:, None, None, :], attention_mask_pruned.bool()[:, None, None, :]
        return self.decode(self.embed_tokens(input_ids), position_ids, past, full, pruned)


def fastv_prefill_spec(layout: LlavaLayout, spec: FastvSpec) -> PartSpec:
    b, n, before, after = EXAMPLE_BATCH, spec.num_image_tokens, 3, 4
    t = before + n + after
    args = (torch.randn(b, t, layout.text_hidden_size), torch.ones(b, t, dtype=torch.long),
            torch.arange(t).expand(b, -1).clone(), (torch.arange(n) + before).expand(b, -1).clone())
    names = ["inputs_embeds", "attention_mask", "position_ids", "image_positions"]
    seq = {0: _BATCH, 1: _SEQ}
    return PartSpec(args, (seq, seq, seq, {0: _BATCH}), names,
                    ["logits", *kv_names("present", layout.num_text_layers), "keep_idx", "image_keep_idx"],
                    {n_: {0: "batch", 1: "sequence"} for n_ in names[:3]} | {"image_positions": {0: "batch"}})


def fastv_decode_spec(layout: LlavaLayout, spec: FastvSpec) -> PartSpec:
    # Example cache lengths: the pruned layers' q = p - dropped must differ from p (two distinct symbols) and stay
    # >= 2 (no 0/1 specialization) whatever the number dropped (hundreds at LLaVA-1.5 sizes).
    b, p = EXAMPLE_BATCH, 12 + max(spec.dropped, 1)
    q = p - max(spec.dropped, 1)
    shape = lambda length: (b, layout.num_kv_heads, length, layout.head_dim)  # noqa: E731
    past = tuple(torch.randn(shape(p if i <= spec.layer else q)) for i in range(layout.num_text_layers) for _ in "kv")
    args = (torch.zeros(b, 1, dtype=torch.long), torch.ones(b, p + 1, dtype=torch.long),
            torch.ones(b, q + 1, dtype=torch.long), torch.full((b, 1), p), *past)
    past_names = kv_names("past", layout.num_text_layers)
    dims = {"input_ids": {0: "batch"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "attention_mask_pruned": {0: "batch", 1: "total_pruned_sequence"}, "position_ids": {0: "batch"}}
    dims |= {name: {0: "batch", 2: "past_sequence" if int(name.split(".")[1]) <= spec.layer else "pruned_past_sequence"}
             for name in past_names}
    return PartSpec(args, ({0: _BATCH}, {0: _BATCH, 1: _SEQ}, {0: _BATCH, 1: _SEQ}, {0: _BATCH},
                           tuple({0: _BATCH, 2: _SEQ} for _ in past)),
                    ["input_ids", "attention_mask", "attention_mask_pruned", "position_ids", *past_names],
                    ["logits", *kv_names("present", layout.num_text_layers)], dims)


def prefill_macs(layout: LlavaLayout, cfg, prompt_length: int, spec: FastvSpec | None) -> int:
    """Multiply-accumulates of the LM prefill for one prompt (projections, MLP, q·Kᵀ and attn·V; causal = half).
    `layout` gives the LM sizes: any family's adapter.LmLayout (a LlavaLayout has the same attributes)."""
    h, i_size, heads = layout.text_hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    d, kv = layout.head_dim, layout.num_kv_heads
    per_token = h * heads * d * 2 + h * kv * d * 2 + 3 * h * i_size
    total = 0
    for layer in range(layout.num_text_layers):
        t = prompt_length if spec is None or layer <= spec.layer else prompt_length - spec.dropped
        total += t * per_token + heads * d * t * (t + 1)  # q·Kᵀ + attn·V over the causal half
        if spec is not None and layer == spec.layer:
            total += h * heads * d + heads * d * prompt_length  # the recomputed score row
            if spec.merge:  # cosine (N x R), the members-after counts (N x N x R), W @ h_img (R x N)
                n, r = spec.num_image_tokens, spec.keep
                total += 2 * n * r * h + n * n * r
    return total + h * layout.vocab_size


# --------------------------------------------------------------------------- eager reference


@contextmanager
def _eager_attention(model: nn.Module):
    cfg = model.model.language_model.config
    old = cfg._attn_implementation
    cfg._attn_implementation = "eager"
    try:
        yield
    finally:
        cfg._attn_implementation = old


@dataclass
class FastvReference:
    tokens: Tensor          # (B, steps)
    logits: Tensor          # (steps, B, V) float32
    image_keep_idx: Tensor  # (B, R) kept image ordinals
    keep_idx: Tensor        # (B, T') kept prompt positions


def check_prompt(input_ids: Tensor, attention_mask: Tensor, image_token_id: int, num_image_tokens: int) -> None:
    """One-line ConfigError unless every row has N image tokens, ends with a text token and is left-padded."""
    counts = (input_ids == image_token_id).sum(1)
    if (counts != num_image_tokens).any():
        b = int(torch.nonzero(counts != num_image_tokens)[0, 0])
        raise ConfigError(f"prompt {b} has {int(counts[b])} image tokens (id {image_token_id}); FastV needs exactly "
                          f"{num_image_tokens} per prompt")
    if (input_ids[:, -1] == image_token_id).any() or (attention_mask[:, -1] == 0).any():
        raise ConfigError("FastV scores the image tokens with the last prompt position: every prompt must end with a "
                          "text token and be left-padded")


def _hand_mask(valid: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive (B, 1, S, S) float mask for eager attention: 0 where causal & valid key (or the diagonal)."""
    s = valid.shape[1]
    i = torch.arange(s)
    ok = (i[None, :, None] >= i[None, None, :]) & valid[:, None, :].bool()
    ok = ok | (i[:, None] == i[None, :])[None]
    return torch.zeros(ok.shape, dtype=dtype).masked_fill(~ok, torch.finfo(dtype).min)[:, None]


def fastv_score_reference(model: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor,
                          layer: int) -> Tensor:
    """(B, T): HF's own eager attention probabilities of layer `layer`, last row, head mean."""
    lm = model.model.language_model
    with torch.no_grad(), _eager_attention(model):
        out = lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                 output_attentions=True, use_cache=False)
    return out.attentions[layer][:, :, -1].float().mean(1)


def reference_image_keep(image_scores: Tensor, spec: FastvSpec) -> Tensor:
    """(B, N) FastV scores of the image tokens -> (B, R) kept ordinals, ascending, written independently of
    select_image_tokens: debias subtracts the bias, uniform=S unites the U fixed ordinals with a TopK over the others
    (no +inf)."""
    if spec.bias is not None:
        image_scores = image_scores - torch.tensor(spec.bias, dtype=image_scores.dtype)
    uniform = spec.uniform_ordinals
    fixed = torch.tensor(uniform, dtype=torch.long)
    others = torch.tensor([i for i in range(spec.num_image_tokens) if i not in uniform], dtype=torch.long)
    best = others[image_scores[:, others].topk(spec.keep - len(fixed), dim=-1).indices]   # (B, R - U) ordinals
    return torch.cat([fixed.expand(image_scores.shape[0], -1), best], dim=1).sort(dim=-1).values


def reference_keep_rows(scores: Tensor, is_image: Tensor, spec: FastvSpec) -> tuple[Tensor, Tensor, Tensor]:
    """FastV's selection on one score row per prompt (B, T) -> (image_pos (B, N): the image tokens' columns,
    image_keep (B, R): the kept ones among them, keep_idx (B, T'): every text column and the kept image columns,
    ascending)."""
    image_pos = torch.stack([torch.nonzero(row).flatten() for row in is_image])       # (B, N)
    image_keep = reference_image_keep(scores.gather(1, image_pos), spec)
    keep_rows = []
    for r in range(is_image.shape[0]):
        keep = ~is_image[r]
        keep[image_pos[r, image_keep[r]]] = True
        keep_rows.append(torch.nonzero(keep).flatten())
    return image_pos, image_keep, torch.stack(keep_rows)                              # keep_idx (B, T')


def reference_merge(h: Tensor, image_positions: Tensor, image_keep: Tensor) -> Tensor:
    """HoliTom's merge, literally its sequential loop (holitom/modeling_qwen2.py), on a copy of h (B, S, C):
    image_positions (B, N) the image tokens' sequence indices, image_keep (B, R) the kept ordinals. Per row: top =
    the kept positions, non = the others (ascending); sim = cosine(h[non], h[top]) once; target = the first maximum;
    then h[target] = (h[target] + h[i]) / 2 for i in non, in order."""
    h = h.clone()
    for b in range(h.shape[0]):
        kept = torch.zeros(image_positions.shape[1], dtype=torch.bool)
        kept[image_keep[b]] = True
        top, non = image_positions[b][kept], image_positions[b][~kept]
        non_x, top_x = h[b, non], h[b, top]
        sim = (non_x @ top_x.T) / (non_x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                                   * top_x.norm(dim=-1, keepdim=True).clamp_min(1e-12).T)  # a 0 vector: cos 0, not NaN
        targets = [int(top[int(torch.nonzero(row == row.max())[0, 0])]) for row in sim]
        for i, t in zip(non.tolist(), targets):
            h[b, t] = (h[b, t] + h[b, i]) / 2
    return h


def reference_fastv_generate(model: nn.Module, input_ids: Tensor, image_features: Tensor, spec: FastvSpec,
                             image_token_id: int, max_new_tokens: int = 8,
                             attention_mask: Tensor | None = None) -> FastvReference:
    """Eager FastV with HF LLaVA's language model: image features placed at the image tokens, 1-D positions
    cumsum(mask) - 1, then reference_generate_layers (the next token's position: the last one + 1)."""
    ids = input_ids.long()
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.long()
    check_prompt(ids, mask, image_token_id, spec.num_image_tokens)
    embeds = place_features(model, ids, image_features, image_token_id)
    pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
    return reference_generate_layers(model, ids == image_token_id, embeds, mask, pos, spec, max_new_tokens,
                                     gather_positions_1d, lambda pos, step: pos[:, -1:] + 1)


def place_features(model: nn.Module, ids: Tensor, image_features: Tensor, placeholder_id: int) -> Tensor:
    """The prompt's token embeddings (B, T, H) with the placeholders' rows replaced by the features, in order."""
    embeds = model.model.language_model.embed_tokens(ids).detach().clone()
    embeds[ids == placeholder_id] = image_features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
    return embeds


def reference_generate_layers(model: nn.Module, is_image: Tensor, embeds: Tensor, mask: Tensor, positions: Tensor,
                              spec: FastvSpec, max_new_tokens: int, gather_positions,
                              next_positions) -> FastvReference:
    """The eager FastV reference of every family, independent of the parts: the score from HF's eager attention
    probabilities (fastv_score_reference), the image positions from `is_image` (B, T) by nonzero, the selection by
    reference_image_keep, merge=true by HoliTom's literal loop (reference_merge); then every greedy step re-runs the
    decoder layers by hand over the whole sequence with no cache: layers 0..L over every token, layers L+1.. over
    the kept prompt tokens plus the generated ones. Family hooks: `gather_positions(pos, cols)` (1-D or M-RoPE ids)
    and `next_positions(pos, step)` -> the ids of the token generated at `step`, appended on the last axis."""
    lm = model.model.language_model
    scores = fastv_score_reference(model, embeds, mask, positions, spec.layer)
    b, t = is_image.shape
    image_pos, image_keep, keep_idx = reference_keep_rows(scores, is_image, spec)
    tokens, logits = [], []
    with torch.no_grad(), _eager_attention(model):
        seq, pos = embeds, positions
        for step in range(max_new_tokens):
            cols = torch.cat([keep_idx, torch.arange(t, seq.shape[1]).expand(b, -1)], dim=1)  # kept prompt + generated
            h, p, v = seq, pos, mask
            for i, layer in enumerate(lm.layers):
                if i == spec.layer + 1:
                    if spec.merge:
                        h = reference_merge(h, image_pos, image_keep)
                    h = torch.stack([h[r, cols[r]] for r in range(b)])
                    p, v = gather_positions(p, cols), v.gather(1, cols)
                h = layer(h, attention_mask=_hand_mask(v, h.dtype), position_embeddings=lm.rotary_emb(h, p),
                          position_ids=p)
            step_logits = model.lm_head(lm.norm(h[:, -1])).float()
            token = step_logits.argmax(-1, keepdim=True)
            tokens.append(token)
            logits.append(step_logits)
            seq = torch.cat([seq, lm.embed_tokens(token)], dim=1)
            pos = torch.cat([pos, next_positions(pos, step)], dim=-1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return FastvReference(torch.cat(tokens, 1), torch.stack(logits), image_keep, keep_idx)


def image_score_rows(model: nn.Module, embeds: Tensor, mask: Tensor, positions: Tensor, is_image: Tensor,
                     layer: int) -> Tensor:
    """(B, N) float64: the reference FastV score (fastv_score_reference) of each row's image tokens at `layer`: what
    debias calibration averages, for every family."""
    scores = fastv_score_reference(model, embeds, mask, positions, layer)
    image_pos = torch.stack([torch.nonzero(row).flatten() for row in is_image])
    return scores.gather(1, image_pos).double()


def calibrate_fastv_bias(model: nn.Module, input_ids: Tensor, image_features: Tensor, layer: int,
                         image_token_id: int, attention_mask: Tensor | None = None) -> np.ndarray:
    """(N,) float64: the FastV score of each image-token position at `layer`, averaged over a calibration batch
    (the positional bias `fastv(debias=true)` subtracts). LLaVA; Qwen2-VL: qwen2_vl_adapter.calibrate_qwen2_fastv_bias
    (both average image_score_rows)."""
    ids = input_ids.long()
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.long()
    is_image = ids == image_token_id
    counts = is_image.sum(1)
    if counts.min() < 1 or (counts != counts[0]).any():
        raise ConfigError("calibration prompts must all carry the same number (>= 1) of image tokens")
    embeds = place_features(model, ids, image_features, image_token_id)
    pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
    return image_score_rows(model, embeds, mask, pos, is_image, layer).mean(0).numpy()
