"""The linear-attention layers' one-token steps (decode) in Triton, with the signatures and Semantics of
`moelora.ops.torch.delta`: the gated delta rule's update of each sequence's state in its slot of the
state cache, and the causal convolution's; and the rule's gates from the b/a projections. Sizes come from
shapes and the slots are read on the device, so all can be captured in CUDA graphs. Whole sequences
(prefill): `delta_prefill.py`.

Delta step: one program per (sequence, value head, tile of BLOCK_V value columns) holds its [Dk, BLOCK_V]
slice of the fp32 state in registers: decay, the delta update with the normalised key, the read with the
normalised query, then the slice written back. Convolution step: one program per (sequence, channel
tile) reads the K - 1 stored inputs, adds the new one, and shifts the state. Gates: one program per tile
of (token, head) entries.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from moelora.ops.triton.common import valid_slot


@triton.jit
def _delta_step_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, state_ptr, slot_ptr, o_ptr, alog_ptr, dt_ptr, num_slots, group,
    sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sg_b, sbeta_b, ss_s, ss_h, ss_k, so_b, so_h,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, GATES: tl.constexpr,
    INTERPRETED: tl.constexpr,
):  # fmt: skip
    """GATES: g_ptr and beta_ptr hold the projections a and b, and the program finds its head's gates
    from them itself (`_gates`: the same values `delta_gates` stores)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < DV
    rows = tl.arange(0, BLOCK_K)
    row_ok = rows < DK
    slot = valid_slot(tl.load(slot_ptr + b), num_slots)  # (a padding row's: num_slots)
    ok = slot < num_slots
    slot = slot.to(tl.int64)
    kh = h // group  # the key head this value head reads
    q = tl.load(q_ptr + b * sq_b + kh * sq_h + rows, mask=row_ok, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + b * sk_b + kh * sk_h + rows, mask=row_ok, other=0.0).to(tl.float32)
    q = q * tl.rsqrt(tl.sum(q * q, axis=0) + 1e-6) / tl.sqrt(DK * 1.0)
    k = k * tl.rsqrt(tl.sum(k * k, axis=0) + 1e-6)
    v = tl.load(v_ptr + b * sv_b + h * sv_h + cols, mask=col_ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + b * sg_b + h).to(tl.float32)
    beta = tl.load(beta_ptr + b * sbeta_b + h)
    if GATES:  # g, beta: a and b, the projections
        g, beta = _gates(g, beta.to(tl.float32), tl.load(alog_ptr + h), tl.load(dt_ptr + h), INTERPRETED)
        beta = beta.to(beta_ptr.dtype.element_ty)  # (stored in b's dtype by `delta_gates`)
    decay = tl.exp(g)
    beta = beta.to(tl.float32)
    tile = tl.where(ok, slot, 0) * ss_s + h * ss_h + rows[:, None] * ss_k + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    state = tl.load(state_ptr + tile, mask=mask & ok, other=0.0) * decay
    predicted = tl.sum(state * k[:, None], axis=0)
    state += k[:, None] * ((v - predicted) * beta)[None, :]
    out = tl.sum(state * q[:, None], axis=0)
    tl.store(o_ptr + b * so_b + h * so_h + cols, out.to(o_ptr.dtype.element_ty), mask=col_ok)
    tl.store(state_ptr + tile, state, mask=mask & ok)


def gated_delta_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    states: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """Same signature and Semantics as `moelora.ops.torch.delta.gated_delta_step`."""
    return _step(q, k, v, g, beta, states, slots, None)


def delta_step_with_gates(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    a_log: torch.Tensor,
    dt_bias: torch.Tensor,
    states: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """`ops.delta_step_with_gates` in one launch: `delta_gates` from the projections a, b [B, Hv], then
    `gated_delta_step`, each program finding its head's gates itself."""
    v_heads = v.shape[1]
    heads_ok = a_log.shape == dt_bias.shape == (v_heads,)
    if a.shape != (v.shape[0], v_heads) or b.shape != a.shape or not heads_ok:
        raise ValueError(
            f"delta_step_with_gates: a {tuple(a.shape)}, b {tuple(b.shape)} [B, {v_heads}]; A_log "
            f"{tuple(a_log.shape)}, dt_bias {tuple(dt_bias.shape)} [{v_heads}]"
        )
    if a.stride(1) != 1 or b.stride(1) != 1:
        raise ValueError("delta_step_with_gates: a and b need unit stride over the heads")
    return _step(q, k, v, a, b, states, slots, (a_log.contiguous(), dt_bias.contiguous()))


def _step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    states: torch.Tensor,
    slots: torch.Tensor,
    gates: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """The step's launch; with `gates` = (A_log, dt_bias), g and beta are the projections a and b."""
    batch, k_heads, dk = k.shape
    v_heads, dv = v.shape[1], v.shape[2]
    if states.shape[1:] != (v_heads, dk, dv) or states.dtype != torch.float32 or v_heads % k_heads:
        raise ValueError(
            f"gated_delta_step: states {tuple(states.shape)} {states.dtype} must be fp32 "
            f"[S, {v_heads}, {dk}, {dv}], and the {k_heads} key heads must divide the {v_heads} value heads"
        )
    if states.stride(3) != 1 or q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("gated_delta_step: unit stride over the head dims")
    out = torch.empty_like(v)
    block_v = min(32, triton.next_power_of_2(dv))
    a_log, dt_bias = (g, g) if gates is None else gates  # (g: placeholders, unread without gates)
    _delta_step_kernel[(batch, v_heads, triton.cdiv(dv, block_v))](
        q, k, v, g, beta, states, slots, out, a_log, dt_bias, states.shape[0], v_heads // k_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), g.stride(0),
        beta.stride(0), *states.stride()[:3], out.stride(0), out.stride(1),
        DK=dk, DV=dv, BLOCK_K=triton.next_power_of_2(dk), BLOCK_V=block_v, GATES=gates is not None,
        INTERPRETED=not q.is_cuda,
    )  # fmt: skip
    return out


@triton.jit
def _conv_step_kernel(
    x_ptr, w_ptr, state_ptr, slot_ptr, y_ptr, num_slots, channels, sx_b, sw_c, ss_s, ss_c, sy_b,
    WIDTH: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < channels
    j = tl.arange(0, BLOCK_W)  # 0 .. K - 2: the stored inputs, oldest first
    j_ok = j < WIDTH - 1
    slot = valid_slot(tl.load(slot_ptr + b), num_slots)  # (a padding row's: num_slots)
    ok = slot < num_slots
    slot = slot.to(tl.int64)
    rows = tl.where(ok, slot, 0) * ss_s + c[:, None] * ss_c
    stored = tl.load(state_ptr + rows + j[None, :], mask=c_ok[:, None] & j_ok[None, :] & ok, other=0.0)
    x = tl.load(x_ptr + b * sx_b + c, mask=c_ok, other=0.0)
    w_old = tl.load(w_ptr + c[:, None] * sw_c + j[None, :], mask=c_ok[:, None] & j_ok[None, :], other=0.0)
    w_new = tl.load(w_ptr + c * sw_c + WIDTH - 1, mask=c_ok, other=0.0)
    acc = tl.sum(stored.to(tl.float32) * w_old.to(tl.float32), axis=1) + x.to(tl.float32) * w_new.to(
        tl.float32
    )
    y = acc / (1.0 + tl.exp(-acc))
    tl.store(y_ptr + b * sy_b + c, y.to(y_ptr.dtype.element_ty), mask=c_ok)
    # The state moves on by one input: entry j takes entry j + 1, the last one the new input.
    later = tl.load(state_ptr + rows + j[None, :] + 1, mask=c_ok[:, None] & (j < WIDTH - 2)[None, :] & ok,
                    other=0.0)  # fmt: skip
    shifted = tl.where((j == WIDTH - 2)[None, :], x[:, None].to(later.dtype), later)
    tl.debug_barrier()  # every program's stored inputs are read before any is overwritten
    tl.store(state_ptr + rows + j[None, :], shifted, mask=c_ok[:, None] & j_ok[None, :] & ok)


def causal_conv_step(
    x: torch.Tensor, weight: torch.Tensor, states: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """Same signature and Semantics as `moelora.ops.torch.delta.causal_conv_step`."""
    batch, channels = x.shape
    width = weight.shape[1]
    if weight.shape[0] != channels or states.shape[1:] != (channels, width - 1) or width < 2:
        raise ValueError(
            f"causal_conv_step: x {tuple(x.shape)}, weight {tuple(weight.shape)}, states "
            f"{tuple(states.shape)} must be [B, C], [C, K >= 2], [S, C, K - 1]"
        )
    if states.stride(2) != 1 or weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("causal_conv_step: unit stride over the last dims")
    y = torch.empty_like(x)
    block_c = min(256, triton.next_power_of_2(channels))
    _conv_step_kernel[(batch, triton.cdiv(channels, block_c))](
        x, weight, states, slots, y, states.shape[0], channels, x.stride(0), weight.stride(0),
        states.stride(0), states.stride(1), y.stride(0),
        WIDTH=width, BLOCK_C=block_c, BLOCK_W=triton.next_power_of_2(width - 1),
    )  # fmt: skip
    return y


@triton.jit
def _gates(a, b, a_log, dt_bias, INTERPRETED: tl.constexpr):
    """g = -exp(A_log) * softplus(a + dt_bias) and beta = sigmoid(b), in fp32 (a, b in fp32; A_log and
    dt_bias in their dtype); softplus(x) = x past 20 (as torch's)."""
    x = a + dt_bias.to(tl.float32)
    e = tl.exp(tl.minimum(x, 20.0))  # (no overflow where the threshold takes x itself)
    soft = tl.log(1.0 + e) if INTERPRETED else libdevice.log1p(e)  # (the interpreter has no libdevice)
    soft = tl.where(x > 20.0, x, soft)
    return -tl.exp(a_log.to(tl.float32)) * soft, 1.0 / (1.0 + tl.exp(-b))


@triton.jit
def _gates_kernel(a_ptr, b_ptr, alog_ptr, dt_ptr, g_ptr, beta_ptr, tokens, heads, s_a, s_b,
                  INTERPRETED: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """g (fp32) and beta (b's dtype) of `_gates` over one tile of (token, head) entries."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < tokens * heads
    t, h = i // heads, i % heads
    a = tl.load(a_ptr + t * s_a + h, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + t * s_b + h, mask=ok, other=0.0).to(tl.float32)
    a_log = tl.load(alog_ptr + h, mask=ok, other=0.0)
    g, beta = _gates(a, b, a_log, tl.load(dt_ptr + h, mask=ok, other=0.0), INTERPRETED)
    tl.store(g_ptr + i, g, mask=ok)
    tl.store(beta_ptr + i, beta.to(beta_ptr.dtype.element_ty), mask=ok)


def delta_gates(
    a: torch.Tensor, b: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same signature and Semantics as `moelora.ops.torch.delta.delta_gates`."""
    tokens, heads = a.shape
    if b.shape != a.shape or a_log.shape != (heads,) or dt_bias.shape != (heads,):
        raise ValueError(
            f"delta_gates: a {tuple(a.shape)}, b {tuple(b.shape)} [T, H]; A_log {tuple(a_log.shape)}, "
            f"dt_bias {tuple(dt_bias.shape)} [H]"
        )
    if a.stride(1) != 1 or b.stride(1) != 1:
        raise ValueError("delta_gates: unit stride over the heads")
    g = torch.empty(tokens, heads, dtype=torch.float32, device=a.device)
    beta = torch.empty(tokens, heads, dtype=b.dtype, device=b.device)
    if tokens:
        block = 1024
        _gates_kernel[(triton.cdiv(tokens * heads, block),)](
            a, b, a_log.contiguous(), dt_bias.contiguous(), g, beta, tokens, heads, a.stride(0), b.stride(0),
            INTERPRETED=not a.is_cuda, BLOCK=block,
        )  # fmt: skip
    return g, beta
