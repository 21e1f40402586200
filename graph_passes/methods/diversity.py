"""Diversity / similarity selection (DivPrune, MMR): greedy selection of K patch tokens.

Both methods are one greedy loop over the cosine similarities S (B, n, n) of the patch tokens (prefix
tokens are always kept). After the first pick the loop carries `state` (B, n), every token's largest
similarity to the tokens chosen so far, with +inf on chosen tokens so that they are never picked again:

    divprune  first = argmax_i min_{j != i} (1 - S[i, j])       (the token farthest from its nearest neighbour)
              next  = argmax_i min_{j chosen} (1 - S[i, j])  = argmin(state)             (DivPrune, Eq. 3)
    mmr       next  = argmax_i λ·imp_i - (1 - λ)·max_{j chosen} S[i, j] = argmax(λ·imp - state'),
              state' the state of (1 - λ)·S, imp = min-max normalized [CLS] attention; first = argmax(imp)
    both      state = where(one_hot(pick), +inf, max(state, S[pick]))

Ties go to the lowest position (torch and ONNX ArgMin/ArgMax both take the first extremum).
Two export forms of the K steps, chosen by the method parameter `loop`:
    loop=false  a Python loop: torch.export records K copies of the step (6 ONNX nodes each, 7 for mmr)
    loop=true   torch's while_loop: torch.onnx turns steps 2..K into one ONNX Loop (check_static must allow Loop)
The kept positions are then sorted, so kept tokens stay in their original order.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch._higher_order_ops.while_loop import while_loop

from tokensieve.graph_passes.methods.attention_scores import cls_attention_scores
from tokensieve.graph_passes.methods.spec import Param, PruneMethod, ScoreInput
from tokensieve.graph_passes.methods.topk import gather_tokens

# Unrolled vs Loop on ONNX Runtime CPU (ViT-S, divprune after block 4, keep 98 of 196): docs/divprune_forms.md.
LOOP_DEFAULT = False
IMPORTANCE_EPS = 1e-6  # IDPruner's ε in the min-max normalization of the importance


def cosine_similarity(x: Tensor) -> Tensor:
    """(B, N, C) -> (B, N, N) float32 cosine similarities (a zero token has similarity 0 to everything).

    Symmetrized, (S + Sᵀ) / 2: a matmul may round S[i, j] and S[j, i] differently, and DivPrune's first step
    ties exactly on every mutual nearest-neighbour pair; exact symmetry makes every backend break it alike.
    """
    x = x.float()
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = torch.matmul(xn, xn.transpose(-2, -1))
    return (sim + sim.transpose(-2, -1)) * 0.5


def _pick(state: Tensor, gain: Tensor | None) -> Tensor:
    """(B, 1, n) -> (B, 1, 1) int64: argmin(state), or argmax(gain - state); ties go to the lowest position."""
    return state.argmin(dim=-1, keepdim=True) if gain is None else (gain - state).argmax(dim=-1, keepdim=True)


def _add(sim: Tensor, state: Tensor | None, pick: Tensor, positions: Tensor) -> Tensor:
    """State after adding `pick`: max(state, S[pick]), +inf at the pick (one-hot by comparison: no scatter)."""
    row = sim.gather(1, pick.expand(-1, -1, sim.shape[-1]))  # S[b, pick[b], :] -> (B, 1, n)
    return torch.where(positions == pick, float("inf"), row if state is None else torch.maximum(state, row))


def greedy_select(sim: Tensor, first: Tensor, keep: int, gain: Tensor | None = None, loop: bool = False,
                  first_gain: Tensor | None = None) -> Tensor:
    """(B, n, n) similarities -> (B, keep) int64 picks, in the order they were chosen.

    The first pick is argmin(first) (argmax(gain - first) when `gain` is given; argmax(first_gain) when that is
    given); after it the state is the max similarity to the chosen set (+inf on chosen tokens) and every pick is
    argmin(state) (argmax(gain - state)).
    Vectors are (B, 1, n) inside, so the row gather needs no Unsqueeze/Squeeze: 6 ONNX nodes a step, 7 with gain.
    With `loop`, steps 2..keep run in torch's while_loop (one ONNX Loop node).
    """
    gain = None if gain is None else gain.unsqueeze(1)
    positions = torch.arange(sim.shape[-1], device=sim.device)
    if first_gain is None:
        pick = _pick(first.unsqueeze(1), gain)
    else:
        pick = first_gain.unsqueeze(1).argmax(dim=-1, keepdim=True)
    state = _add(sim, None, pick, positions)
    if not loop or keep == 1:
        picks = [pick]
        for _ in range(keep - 1):
            pick = _pick(state, gain)
            state = _add(sim, state, pick, positions)
            picks.append(pick)
        return torch.cat(picks, dim=2).squeeze(1)

    slots = torch.arange(1, keep, device=sim.device)

    def cond(i, state, picks):
        return i < keep

    def body(i, state, picks):
        pick = _pick(state, gain)
        return i + 1, _add(sim, state, pick, positions), picks + (slots == i) * pick  # one-hot write of slot i

    picks0 = torch.zeros_like(pick).expand(-1, -1, keep - 1).clone()
    start = torch.ones((), dtype=torch.long, device=sim.device)
    _, _, picks = while_loop(cond, body, (start, state, picks0))
    # ONNX shape inference forgets the shapes of Loop-carried values. An identity GatherElements, whose output
    # takes the shape of its index (B, 1, keep - 1), built outside the Loop, makes every size after the Loop known.
    picks = picks.gather(2, (slots - 1).expand_as(picks0))
    return torch.cat([pick, picks], dim=2).squeeze(1)


def _reduce(x: Tensor, picks: Tensor, num_prefix_tokens: int) -> tuple[Tensor, Tensor]:
    # TopK with a literal K (not sort): it exports with a static K, so every size stays known after export.
    idx = picks.topk(picks.shape[-1], dim=-1, largest=False).values + num_prefix_tokens
    return gather_tokens(x, idx, num_prefix_tokens), idx


def divprune_first(sim: Tensor) -> Tensor:
    """Each token's largest similarity to another token, max_{j != i} S[i, j] -> (B, n); the first pick is its argmin.

    DivPrune's first pick is the token whose nearest neighbour is farthest (the official code takes the
    second-smallest distance of each column, the smallest being the token itself).
    """
    n = sim.shape[-1]
    positions = torch.arange(n, device=sim.device)
    eye = positions.unsqueeze(1) == positions
    return torch.where(eye, float("-inf"), sim).amax(dim=-1)


def divprune_select(x: Tensor, keep: int, loop: bool = LOOP_DEFAULT) -> Tensor:
    """Greedy max-min cosine diversity over the tokens of x (B, n, C) -> (B, keep) picks in selection order."""
    sim = cosine_similarity(x)
    return greedy_select(sim, divprune_first(sim), keep, loop=loop)


def divprune(x: Tensor, sim: Tensor, keep: int, num_prefix_tokens: int = 1, loop: bool = LOOP_DEFAULT) -> tuple[Tensor, Tensor]:
    """DivPrune reduce: `sim` is `cosine_similarity(x)` (B, N, N) -> ((B, p + keep, C), kept positions (B, keep))."""
    p = num_prefix_tokens
    patch_sim = sim[:, p:, p:]
    picks = greedy_select(patch_sim, divprune_first(patch_sim), keep, loop=loop)
    return _reduce(x, picks, p)


def normalized_importance(scores: Tensor) -> Tensor:
    """Min-max normalization over the tokens, (w - min) / (max - min + ε) -> (B, n) in [0, 1] (IDPruner)."""
    lo, hi = scores.amin(dim=-1, keepdim=True), scores.amax(dim=-1, keepdim=True)
    return (scores - lo) / (hi - lo + IMPORTANCE_EPS)


def mmr_select(x: Tensor, importance: Tensor, keep: int, lam: float = 0.5, loop: bool = LOOP_DEFAULT) -> Tensor:
    """MMR over the tokens of x (B, n, C) with raw importance (B, n) -> (B, keep) picks in selection order.

    Scaling S by (1 - λ) >= 0 commutes with the max, so the state is (1 - λ)·max similarity to the chosen set.
    The first pick is the most important token whatever λ (IDPruner's code: the first round's score is the
    importance alone), so λ = 0 starts from it too (not from token 0).
    """
    sim = cosine_similarity(x) * (1.0 - lam)
    importance = normalized_importance(importance.float())
    gain = importance * lam
    return greedy_select(sim, torch.zeros_like(gain), keep, gain=gain, loop=loop, first_gain=importance)


def mmr(x: Tensor, scores: Tensor, keep: int, num_prefix_tokens: int = 1, lam: float = 0.5,
        loop: bool = LOOP_DEFAULT) -> tuple[Tensor, Tensor]:
    """MMR reduce: `scores` (B, N) is the [CLS] attention row -> ((B, p + keep, C), kept positions (B, keep))."""
    p = num_prefix_tokens
    picks = mmr_select(x[:, p:], scores[:, p:], keep, lam, loop)
    return _reduce(x, picks, p)


LOOP = Param("loop", LOOP_DEFAULT, "export the K greedy steps as one ONNX Loop node instead of K unrolled steps "
             "(the export must then allow Loop)", bool)

METHODS: tuple = (
    PruneMethod(
        name="divprune",
        summary="keep the most diverse patch tokens: greedily add the token farthest (cosine) from those kept",
        paper="DivPrune (Alvar et al., CVPR 2025)",
        score_input=ScoreInput.TOKENS, score=cosine_similarity,
        reduce_fn=divprune, params=(LOOP,), reduce_params=("loop",),
    ),
    PruneMethod(
        name="mmr",
        summary="Maximal Marginal Relevance: greedily add the token maximizing λ·[CLS] attention − (1−λ)·similarity to those kept",
        paper="IDPruner (Tan et al., 2026); MMR (Carbonell & Goldstein, SIGIR 1998)",
        score_input=ScoreInput.ATTENTION_QK, score=cls_attention_scores, requires_cls=True,
        reduce_fn=mmr,
        params=(Param("lam", 0.5, "λ: weight of importance vs diversity (1 = [CLS] top-k, 0 = diversity only)",
                      float, 0.0, 1.0), LOOP),
        reduce_params=("lam", "loop"),
    ),
)
