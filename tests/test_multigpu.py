"""TP x EP on GPUs with NCCL: the mixed adapter batch of tests/test_parallel.py agrees with the one-GPU run
(fp32 tightly, bf16 within bf16 tolerance). Marked `multigpu(n)`: skipped with fewer than n GPUs."""

from __future__ import annotations

import pytest
import torch

from tests.test_parallel import run_batch

LAYOUTS = [(2, 1), (2, 2), (4, 2), (4, 4)]
# (absolute, relative): a bf16 logit near 40 is only known to a quarter (its ulp), so a deep-tail
# log-prob of -42 may move by ~0.2 when the sums run in another order.
TOL = {"float32": (2e-3, 0.0), "bfloat16": (0.1, 2**-7)}


@pytest.fixture(scope="module")
def one_gpu(checkpoints, mixed_adapters) -> dict[str, object]:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return {
        d: run_batch(checkpoints["qwen3_moe"], mixed_adapters["qwen3_moe"], 1, 1, d, device="cuda")
        for d in TOL
    }


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize(
    ("tp", "ep"), [pytest.param(t, e, marks=pytest.mark.multigpu(t), id=f"tp{t}-ep{e}") for t, e in LAYOUTS]
)
def test_gpu_layout_matches_one_gpu(tp, ep, dtype, checkpoints, mixed_adapters, one_gpu):
    lora, outs, _ = run_batch(
        checkpoints["qwen3_moe"], mixed_adapters["qwen3_moe"], tp, ep, dtype, device="cuda"
    )
    _, ref_outs, _ = one_gpu[dtype]
    tol = TOL[dtype]
    for name, out, ref in zip(lora, outs, ref_outs, strict=True):
        where = f"tp={tp} ep={ep} {dtype} {name or 'base'}"
        for i, (got, want) in enumerate(
            zip(out.prompt_logprobs[1:], ref.prompt_logprobs[1:], strict=True), 1
        ):
            for tok in set(got) & set(want):
                atol, rtol = tol
                assert abs(got[tok] - want[tok]) < atol + rtol * abs(want[tok]), (
                    where,
                    i,
                    tok,
                    got[tok],
                    want[tok],
                )
        if dtype == "float32":
            assert out.token_ids == ref.token_ids, where
