"""TP x EP on GPUs with NCCL: the mixed adapter batch of tests/test_parallel.py agrees with the one-GPU run.
Marked `multigpu(n)`: skipped with fewer than n GPUs.

fp32: the same tokens and log-probs within 2e-3 of one GPU. bf16: rounding alone moves log-probs by tenths
on these tiny models (logits near 40 have an ulp of 0.25), so a fixed threshold would be either flaky or
blind. Instead both bf16 runs are measured against the one-GPU fp32 run, and the split run may be at most
twice as far from it as the one-GPU bf16 run is (plus 0.05): a sharding error moves log-probs by units.
"""

from __future__ import annotations

import pytest
import torch

from moelora.outputs import RequestOutput
from tests.test_parallel import run_batch

# (family, tp, ep): the Qwen3-MoE matrix, and Qwen2-MoE's 6 experts over ep=4 (2, 2, 1, 1: uneven).
LAYOUTS = [
    *[("qwen3_moe", tp, ep) for tp, ep in [(2, 1), (2, 2), (4, 1), (4, 2), (4, 4)]],
    ("qwen2_moe", 2, 2),
    ("qwen2_moe", 4, 4),
]
DTYPES = ("float32", "bfloat16")


@pytest.fixture(scope="module")
def one_gpu(checkpoints, mixed_adapters) -> dict[tuple[str, str], list[RequestOutput]]:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    families = sorted({f for f, _, _ in LAYOUTS})
    return {
        (f, d): run_batch(checkpoints[f], mixed_adapters[f], 1, 1, d, device="cuda")[1]
        for f in families
        for d in DTYPES
    }


def distance(outs: list[RequestOutput], refs: list[RequestOutput]) -> float:
    """Largest |log-prob difference| over every prompt position and token both runs report."""
    worst = 0.0
    for out, ref in zip(outs, refs, strict=True):
        assert out.prompt_logprobs is not None and ref.prompt_logprobs is not None
        for got, want in zip(out.prompt_logprobs[1:], ref.prompt_logprobs[1:], strict=True):
            assert got is not None and want is not None
            worst = max([worst, *(abs(got[t] - want[t]) for t in set(got) & set(want))])
    return worst


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("family", "tp", "ep"),
    [pytest.param(f, t, e, marks=pytest.mark.multigpu(t), id=f"{f}-tp{t}-ep{e}") for f, t, e in LAYOUTS],
)
def test_gpu_layout_matches_one_gpu(family, tp, ep, dtype, checkpoints, mixed_adapters, one_gpu):
    _, outs, _ = run_batch(checkpoints[family], mixed_adapters[family], tp, ep, dtype, device="cuda")
    fp32 = one_gpu[(family, "float32")]
    if dtype == "float32":
        assert distance(outs, fp32) < 2e-3
        assert [o.token_ids for o in outs] == [o.token_ids for o in fp32]
    else:
        split, single = distance(outs, fp32), distance(one_gpu[(family, "bfloat16")], fp32)
        assert split <= 2 * single + 0.05, (split, single)
