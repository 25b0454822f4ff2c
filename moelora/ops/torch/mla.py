"""PyTorch multi-head latent attention (DeepSeek-V2/V3) over a paged cache of latents. Prefill, in the
expanded form: each step gathers a sequence's cached latents, the caller expands them to per-head keys and
values (its kv_b projection, adapters included), and the queries attend causally over them. Decode, in the
absorbed form (`latent_decode`): the caller projects each head's query into the latent space, the query
attends over the cached latents themselves, and the caller projects the result out (kv_b never runs over
the cached tokens).

Cache layout (one "head"): the K cache holds each token's normalised latent [kv_lora_rank], the V cache
its rotated key part [qk_rope_head_dim], which every head shares."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moelora.ops.torch import acc_dtype


def write_latent(
    latent: torch.Tensor,
    k_rot: torch.Tensor,
    latent_cache: torch.Tensor,
    rot_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """latent [T, R], k_rot [T, Dr] into their caches [num_blocks, block_size, 1, R or Dr] at the tokens'
    slots (slot = block * block_size + offset)."""
    latent_cache.view(-1, latent_cache.shape[-1])[slot_mapping] = latent.to(latent_cache.dtype)
    rot_cache.view(-1, rot_cache.shape[-1])[slot_mapping] = k_rot.to(rot_cache.dtype)


def gather_latents(
    latent_cache: torch.Tensor,
    rot_cache: torch.Tensor,
    block_tables: torch.Tensor,
    kv_lens: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sequence's cached tokens back to back: (latents [sum kv_lens, R], k_rot [sum kv_lens, Dr])."""
    block_size = latent_cache.shape[1]
    latents, rots = [], []
    for b, total in enumerate(kv_lens):
        blocks = block_tables[b, : (total + block_size - 1) // block_size].long()
        latents.append(latent_cache[blocks].flatten(0, 1)[:total, 0])
        rots.append(rot_cache[blocks].flatten(0, 1)[:total, 0])
    return torch.cat(latents), torch.cat(rots)


def mla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: tuple[int, ...],
    kv_lens: tuple[int, ...],
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over all its tokens.

    q [T, H, Dqk] (seq_lens[b] new tokens of sequence b, back to back); k [L, H, Dqk] and v [L, H, Dv]
    (kv_lens[b] tokens of sequence b, back to back, its new ones last) -> o [T, H, Dv].
    Semantics: query i of sequence b sits at position kv_lens[b] - seq_lens[b] + i and attends keys
    j <= it; score = scale * q.k; o = softmax(score) @ v, softmax in fp32 (fp64 for fp64 inputs).
    """
    acc = acc_dtype(q.dtype)
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    start = kv_start = 0
    for n, total in zip(seq_lens, kv_lens, strict=True):
        qs = q[start : start + n].transpose(0, 1).to(acc)  # [H, n, Dqk]
        ks = k[kv_start : kv_start + total].transpose(0, 1).to(acc)
        vs = v[kv_start : kv_start + total].transpose(0, 1).to(acc)
        pos = torch.arange(total - n, total, device=q.device)[:, None]
        allowed = torch.arange(total, device=q.device)[None, :] <= pos
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale)
        out[start : start + n] = o.transpose(0, 1).to(q.dtype)
        start += n
        kv_start += total
    return out


def latent_decode(
    q_lat: torch.Tensor,
    q_rot: torch.Tensor,
    latent_cache: torch.Tensor,
    rot_cache: torch.Tensor,
    block_tables: torch.Tensor,
    kv_lens: tuple[int, ...],
    scale: float,
) -> torch.Tensor:
    """One new token per sequence attending over all its cached tokens, in the latent space.

    q_lat [B, H, R] (each head's query without position, projected through its key half of kv_b), q_rot
    [B, H, Dr]; caches as `write_latent`'s (sequence b's kv_lens[b] tokens, its new one included)
    -> o_lat [B, H, R]. Semantics: score[h, j] = scale * (q_lat[h] . c_j + q_rot[h] . r_j) over b's
    tokens j, o_lat[h] = softmax(score[h]) @ c, softmax in fp32 (fp64 for fp64 inputs)."""
    acc = acc_dtype(q_lat.dtype)
    out = q_lat.new_empty(q_lat.shape)
    latents, rots = gather_latents(latent_cache, rot_cache, block_tables, kv_lens)
    start = 0
    for b, total in enumerate(kv_lens):
        c, r = latents[start : start + total].to(acc), rots[start : start + total].to(acc)  # [L, R], [L, Dr]
        score = (q_lat[b].to(acc) @ c.T + q_rot[b].to(acc) @ r.T) * scale  # [H, L]
        out[b] = (torch.softmax(score, dim=-1) @ c).to(q_lat.dtype)
        start += total
    return out
