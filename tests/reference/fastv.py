"""FastV (Chen et al., ECCV 2024): drop the image tokens the last token attends to least, inside the LLM prefill.

Source: github.com/pkunlp-icler/FastV @ d1659729b5bf1be225e99ee15783deeea80f63b1
  src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py lines 1035-1064 (`LlamaModel.forward`
  with fastv_config): at layer index FASTV_k, the attention probabilities of layer FASTV_k - 1
  (`output_attentions` only there, lines 1105-1108), mean over heads of batch element 0, the LAST token's row,
  restricted to the image tokens, torch.topk of round(image_token_length * (1 - FASTV_r)), keep_indexs = the text
  before + the kept image tokens + the text after, sorted; hidden states gathered, position_ids = keep_indexs (the
  kept tokens keep their original positions).
Adapted only to take the attention probabilities [B, H, T, T] and the configuration as plain values.
"""
from __future__ import annotations

import torch


def fastv_keep_indexs(last_layer_attention: torch.Tensor, image_token_start_index: int, image_token_length: int,
                      fastv_r: float) -> torch.Tensor:
    """-> keep_indexs [T'] (sorted); the hidden states and the position ids of the later layers are gathered at it."""
    device = last_layer_attention.device
    seq_length_with_past = last_layer_attention.shape[-1]
    # compute average attention over different head
    last_layer_attention_avg = torch.mean(last_layer_attention, dim=1)[0]
    # generate new attention mask based on the average attention, sample the top ATTENTION_RANK tokens with highest attention
    last_layer_attention_avg_last_tok = last_layer_attention_avg[-1]
    # get the attention in image token
    last_layer_attention_avg_last_tok_image = last_layer_attention_avg_last_tok[
        image_token_start_index:image_token_start_index + image_token_length]
    # get the indexs of the top ATTENTION_RANK tokens
    top_attention_rank_index = last_layer_attention_avg_last_tok_image.topk(
        round(image_token_length * (1 - fastv_r))).indices + image_token_start_index
    # keep index
    keep_indexs = torch.cat((torch.arange(image_token_start_index, device=device), top_attention_rank_index,
                             torch.arange(image_token_start_index + image_token_length, seq_length_with_past,
                                          device=device)))
    # sort index
    keep_indexs = keep_indexs.sort().values
    return keep_indexs
