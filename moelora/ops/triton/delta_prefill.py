"""The linear-attention layers over whole sequences (prefill) in Triton, with the signatures and Semantics
of `moelora.ops.torch.delta`: the gated delta rule and the causal convolution, from given states.

The delta rule in chunks of CHUNK tokens (transformers' chunked form, in fp32; its products on the tensor
cores as three tf32 products each (`tf32x3`): within about 1e-6 of fp32 products, and 8x faster than them
on an H200): with S the state before a chunk, G the within-chunk cumulative log decay and
A[i, j] = beta_i exp(G_i - G_j) k_i.k_j for j < i, the chunk's new values are
    delta = T (beta v) - T (beta exp(G) k) S,   T = (I + A)^-1 (forward substitution over the rows),
its outputs o = (exp(G) q) S + ((q k^T) * exp(G_i - G_j), j <= i) delta, and the state moves on to
exp(G_last) S + (exp(G_last - G) k)^T delta. One program per (sequence, value head, value tile) walks its
sequence's chunks in order, the state slice in registers. T does not depend on the state: a first launch
(`split`, one program per (chunk, value head), all chunks at once) solves it and stores T - I, so the walk
keeps only its products (the substitution's CHUNK - 1 dependent row steps leave the sequential path).

The convolution: one program per (sequence, channel tile, token tile), the taps before a sequence's first
token read from its initial state (or zeros); the program of the first token tile also writes the
sequence's last K - 1 inputs as its state.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from moelora.ops.plan import TUNED, KernelPlan
from moelora.ops.triton.common import device_ints, num_sms


@triton.jit
def _unit_rows(k_ptr, g_ptr, beta_ptr, rows, t_ok, kh, h, sk_t, sk_h, sg_t, sbeta_t,
               DK: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """A chunk's normalised keys [CHUNK, BLOCK_K] (rows past its end zero), cumulative log decay [CHUNK]
    (rows past the end add 0) and beta [CHUNK] (0 past the end), all fp32."""
    dk = tl.arange(0, BLOCK_K)
    kd_mask = t_ok[:, None] & (dk < DK)[None, :]
    k = tl.load(k_ptr + rows[:, None] * sk_t + kh * sk_h + dk[None, :], mask=kd_mask, other=0.0)
    k = k.to(tl.float32)
    k = k * tl.rsqrt(tl.sum(k * k, axis=1) + 1e-6)[:, None]
    g = tl.load(g_ptr + rows * sg_t + h, mask=t_ok, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + rows * sbeta_t + h, mask=t_ok, other=0.0).to(tl.float32)
    return k, tl.cumsum(g, axis=0), beta


@triton.jit
def _substitute(k, cum, beta, r, lower, CHUNK: tl.constexpr, PRECISION: tl.constexpr):
    """T - I [CHUNK, CHUNK] (strictly lower) of T = (I + A)^-1, A[i, j] = beta_i exp(G_i - G_j) k_i.k_j
    below the diagonal: forward substitution, row i from the rows above it."""
    kk = tl.dot(k, tl.trans(k), input_precision=PRECISION)
    m = tl.where(lower, -(beta[:, None] * kk * tl.exp(cum[:, None] - cum[None, :])), 0.0)
    for i in tl.static_range(1, CHUNK):
        row = tl.sum(tl.where(r[:, None] == i, m, 0.0), axis=0)
        row = row + tl.sum(row[:, None] * m, axis=0)
        m = tl.where(r[:, None] == i, row[None, :], m)
    return m


@triton.jit
def _delta_inverse_kernel(
    k_ptr, g_ptr, beta_ptr, chunks_ptr, m_ptr, group, sk_t, sk_h, sg_t, sbeta_t, sm_t, sm_h,
    DK: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Chunk c (its first token and length at chunks_ptr[2c], [2c + 1]) of value head h: T - I, row i of
    it stored at the chunk's i-th token (m [tokens, value heads, CHUNK])."""
    c = tl.program_id(0)
    h = tl.program_id(1)
    first = tl.load(chunks_ptr + 2 * c)
    n = tl.load(chunks_ptr + 2 * c + 1)
    r = tl.arange(0, CHUNK)
    t_ok = r < n
    rows = (first + r).to(tl.int64)
    k, cum, beta = _unit_rows(k_ptr, g_ptr, beta_ptr, rows, t_ok, h // group, h, sk_t, sk_h, sg_t, sbeta_t,
                              DK, BLOCK_K)  # fmt: skip
    m = _substitute(k, cum, beta, r, r[:, None] > r[None, :], CHUNK, PRECISION)
    tl.store(m_ptr + rows[:, None] * sm_t + h * sm_h + r[None, :], m, mask=t_ok[:, None])


@triton.jit
def _delta_chunk_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, starts_ptr, init_ptr, o_ptr, final_ptr, m_ptr, group,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sg_t, sbeta_t, si_b, si_h, si_k, so_t, so_h, sf_b, sf_h, sf_k,
    sm_t, sm_h,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, CHUNK: tl.constexpr,
    HAS_INITIAL: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """The walk over a sequence's chunks (module docstring); with SPLIT each chunk's T - I comes from
    `_delta_inverse_kernel` (m_ptr), else it is solved here."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < DV
    dk = tl.arange(0, BLOCK_K)
    dk_ok = dk < DK
    start = tl.load(starts_ptr + b)
    n = tl.load(starts_ptr + b + 1) - start
    kh = h // group  # the key head this value head reads
    r = tl.arange(0, CHUNK)
    lower = r[:, None] > r[None, :]
    eye = tl.where(r[:, None] == r[None, :], 1.0, 0.0)
    state_tile = dk[:, None] * sf_k + cols[None, :]
    state_mask = dk_ok[:, None] & col_ok[None, :]
    if HAS_INITIAL:
        s = tl.load(init_ptr + b * si_b + h * si_h + dk[:, None] * si_k + cols[None, :], mask=state_mask,
                    other=0.0).to(tl.float32)  # fmt: skip
    else:
        s = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    c0 = 0
    while c0 < n:
        t = c0 + r
        t_ok = t < n
        rows = (start + t).to(tl.int64)
        kd_mask = t_ok[:, None] & dk_ok[None, :]
        q = tl.load(q_ptr + rows[:, None] * sq_t + kh * sq_h + dk[None, :], mask=kd_mask, other=0.0)
        v_mask = t_ok[:, None] & col_ok[None, :]
        v = tl.load(v_ptr + rows[:, None] * sv_t + h * sv_h + cols[None, :], mask=v_mask, other=0.0)
        v = v.to(tl.float32)
        q = q.to(tl.float32)
        q = q * tl.rsqrt(tl.sum(q * q, axis=1) + 1e-6)[:, None] / tl.sqrt(DK * 1.0)
        # cum: rows past the end add 0, so cum[CHUNK - 1] is the last token's
        k, cum, beta = _unit_rows(k_ptr, g_ptr, beta_ptr, rows, t_ok, kh, h, sk_t, sk_h, sg_t, sbeta_t,
                                  DK, BLOCK_K)  # fmt: skip
        decay = tl.exp(cum[:, None] - cum[None, :])
        if SPLIT:
            m_rows = m_ptr + rows[:, None] * sm_t + h * sm_h + r[None, :]
            m = tl.load(m_rows, mask=t_ok[:, None] & lower, other=0.0)
        else:
            m = _substitute(k, cum, beta, r, lower, CHUNK, PRECISION)
        inv = m + eye  # (I + A)^-1
        w = tl.dot(inv, k * (beta * tl.exp(cum))[:, None], input_precision=PRECISION)
        u = tl.dot(inv, v * beta[:, None], input_precision=PRECISION)
        delta = u - tl.dot(w, s, input_precision=PRECISION)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        intra = tl.where(lower | (r[:, None] == r[None, :]), qk * decay, 0.0)
        o = tl.dot(q * tl.exp(cum)[:, None], s, input_precision=PRECISION) + tl.dot(
            intra, delta, input_precision=PRECISION
        )
        tl.store(o_ptr + rows[:, None] * so_t + h * so_h + cols[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=v_mask)  # fmt: skip
        last = tl.sum(tl.where(r == CHUNK - 1, cum, 0.0), axis=0)
        k_last = tl.trans(k * tl.exp(last - cum)[:, None])
        s = s * tl.exp(last) + tl.dot(k_last, delta, input_precision=PRECISION)
        c0 += CHUNK
    tl.store(final_ptr + b * sf_b + h * sf_h + state_tile, s, mask=state_mask)


def device_starts(seq_lens: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[B + 1] int32 offsets of each sequence's first token (and the total) on the device."""
    return torch.tensor([0, *itertools.accumulate(seq_lens)], dtype=torch.int32).to(device)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    seq_lens: tuple[int, ...],
    initial: torch.Tensor | None = None,
    plan: KernelPlan = TUNED,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same signature and Semantics as `moelora.ops.torch.delta.gated_delta_rule`; `plan.delta`: the
    chunk, value tile, product precision, warps and whether the chunks' (I + A)^-1 is solved first."""
    tokens, k_heads, dk = k.shape
    v_heads, dv = v.shape[1], v.shape[2]
    if v_heads % k_heads or sum(seq_lens) != tokens or q.shape != k.shape:
        raise ValueError(
            f"gated_delta_rule: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} for sequences of "
            f"{list(seq_lens)} tokens: the {k_heads} key heads must divide the {v_heads} value heads"
        )
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("gated_delta_rule: unit stride over the head dims")
    if g.stride(1) != 1 or beta.stride(1) != 1:
        raise ValueError("gated_delta_rule: unit stride over g's and beta's heads")
    batch = len(seq_lens)
    out = torch.empty_like(v)
    finals = torch.empty(batch, v_heads, dk, dv, dtype=torch.float32, device=v.device)
    if initial is not None and (initial.shape != finals.shape or initial.stride(3) != 1):
        raise ValueError(f"gated_delta_rule: initial {tuple(initial.shape)} must be {tuple(finals.shape)}")
    if batch == 0:
        return out, finals
    init = initial if initial is not None else finals
    group, dk_pad = v_heads // k_heads, max(16, triton.next_power_of_2(dk))
    t = plan.delta
    chunk, precision, num_warps = t.chunk, t.precision, t.warps
    m = finals  # a placeholder, never read, without `split`
    if t.split:
        # (first token, length) of every chunk of every sequence
        firsts = itertools.accumulate((0, *seq_lens))
        bounds = [
            (first + c0, min(chunk, n - c0))
            for first, n in zip(firsts, seq_lens, strict=False)
            for c0 in range(0, n, chunk)
        ]
        m = torch.empty(tokens, v_heads, chunk, dtype=torch.float32, device=v.device)
        if bounds:
            chunks = device_ints([x for bound in bounds for x in bound], v.device)
            _delta_inverse_kernel[(len(bounds), v_heads)](
                k, g, beta, chunks, m, group, k.stride(0), k.stride(1), g.stride(0), beta.stride(0),
                m.stride(0), m.stride(1), DK=dk, BLOCK_K=dk_pad, CHUNK=chunk, PRECISION=precision,
                num_warps=num_warps,
            )  # fmt: skip
    block_v = t.block_v
    if block_v is None:  # narrow tiles fill the card; wider ones redo a chunk's key work fewer times
        block_v = 32 if batch * v_heads * triton.cdiv(dv, 32) <= 2 * num_sms(v.device) else 64
    block_v = max(16, min(block_v, triton.next_power_of_2(dv)))
    _delta_chunk_kernel[(batch, v_heads, triton.cdiv(dv, block_v))](
        q, k, v, g, beta, device_starts(seq_lens, v.device), init, out, finals, m, group,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), g.stride(0),
        beta.stride(0), *init.stride()[:3], out.stride(0), out.stride(1), *finals.stride()[:3],
        m.stride(0), m.stride(1),
        DK=dk, DV=dv, BLOCK_K=dk_pad, BLOCK_V=block_v, CHUNK=chunk,
        HAS_INITIAL=initial is not None, SPLIT=t.split, PRECISION=precision, num_warps=num_warps,
    )  # fmt: skip
    return out, finals


@triton.jit
def _conv_kernel(
    x_ptr, w_ptr, init_ptr, starts_ptr, y_ptr, state_ptr, channels, sx_t, sw_c, si_b, si_c, sy_t, ss_b, ss_c,
    WIDTH: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr,
    HAS_INITIAL: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < channels
    start = tl.load(starts_ptr + b)
    n = tl.load(starts_ptr + b + 1) - start
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < n
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(WIDTH):
        src = t - (WIDTH - 1) + j  # the input this tap reads, in the sequence (< 0: the initial state)
        x = tl.load(x_ptr + (start + src).to(tl.int64)[:, None] * sx_t + c[None, :],
                    mask=(t_ok & (src >= 0))[:, None] & c_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
        if HAS_INITIAL:
            before = tl.load(init_ptr + b * si_b + c[None, :] * si_c + (src + WIDTH - 1)[:, None],
                             mask=(t_ok & (src < 0))[:, None] & c_ok[None, :], other=0.0)  # fmt: skip
            x += before.to(tl.float32)
        acc += x * tl.load(w_ptr + c * sw_c + j, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    y = acc / (1.0 + tl.exp(-acc))
    tl.store(y_ptr + (start + t).to(tl.int64)[:, None] * sy_t + c[None, :], y.to(y_ptr.dtype.element_ty),
             mask=t_ok[:, None] & c_ok[None, :])  # fmt: skip
    if tl.program_id(2) == 0:  # the state: the last K - 1 inputs, the initial state's where n < K - 1
        i = tl.arange(0, BLOCK_W)
        i_ok = i < WIDTH - 1
        tail = n - (WIDTH - 1) + i  # (a new name: Triton keeps a name's shape across the branch)
        mask = (i_ok & (tail >= 0))[:, None] & c_ok[None, :]
        last = tl.load(x_ptr + (start + tail).to(tl.int64)[:, None] * sx_t + c[None, :], mask=mask, other=0.0)
        if HAS_INITIAL:
            kept = tl.load(init_ptr + b * si_b + c[None, :] * si_c + (tail + WIDTH - 1)[:, None],
                           mask=(i_ok & (tail < 0))[:, None] & c_ok[None, :], other=0.0)  # fmt: skip
            last = tl.where((tail >= 0)[:, None], last, kept.to(last.dtype))
        tl.store(state_ptr + b * ss_b + c[None, :] * ss_c + i[:, None], last,
                 mask=i_ok[:, None] & c_ok[None, :])  # fmt: skip


def causal_conv(
    x: torch.Tensor, weight: torch.Tensor, seq_lens: tuple[int, ...], initial: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same signature and Semantics as `moelora.ops.torch.delta.causal_conv`."""
    tokens, channels = x.shape
    width = weight.shape[1]
    if weight.shape[0] != channels or width < 2 or sum(seq_lens) != tokens:
        raise ValueError(
            f"causal_conv: x {tuple(x.shape)}, weight {tuple(weight.shape)} for sequences of "
            f"{list(seq_lens)} tokens must be [T, C], [C, K >= 2]"
        )
    if weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("causal_conv: unit stride over the last dims")
    batch = len(seq_lens)
    y = torch.empty_like(x)
    states = x.new_empty(batch, channels, width - 1)
    if initial is not None and (initial.shape != states.shape or initial.stride(2) != 1):
        raise ValueError(f"causal_conv: initial {tuple(initial.shape)} must be {tuple(states.shape)}")
    if batch == 0:
        return y, states
    init = initial if initial is not None else states
    block_c, block_t = min(128, triton.next_power_of_2(channels)), 16
    grid = (batch, triton.cdiv(channels, block_c), max(1, triton.cdiv(max(seq_lens), block_t)))
    _conv_kernel[grid](
        x, weight, init, device_starts(seq_lens, x.device), y, states, channels, x.stride(0),
        weight.stride(0), init.stride(0), init.stride(1), y.stride(0), states.stride(0), states.stride(1),
        WIDTH=width, BLOCK_C=block_c, BLOCK_T=block_t, BLOCK_W=triton.next_power_of_2(width - 1),
        HAS_INITIAL=initial is not None,
    )  # fmt: skip
    return y, states
