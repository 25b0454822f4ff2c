"""The sampler's race kernel (`ops/triton/sample.py`) against its PyTorch twin: the noise bit for bit, the
draw from logits and from truncated probabilities, ties and rows of zeros, a vocabulary that is not a
whole number of chunks. Without CUDA the kernel runs in Triton's interpreter (a few rows); on GPU a full
Qwen3 vocabulary at batch 256."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from moelora.ops.torch import sample as twin  # noqa: E402
from moelora.ops.triton import sample as kern  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def hashes(rows: int, seed: int) -> torch.Tensor:
    """Row keys as the sampler makes them (negative int32 bit patterns included)."""
    return torch.tensor([twin.row_hash(seed + r, 3 * r) for r in range(rows)], dtype=torch.int32)


def inputs(rows: int, vocab: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(rows, vocab, generator=g)
    x[:, ::7] = float("-inf")  # masked tokens (q = 0)
    temperature = torch.rand(rows, generator=g) * 1.5 + 0.1
    temperature[0] = 1e-30  # tiny: the draw is the argmax
    return x, x.amax(dim=-1), temperature, hashes(rows, seed)


def scores(x, top, temperature, row_hashes, from_logits: bool) -> torch.Tensor:
    q = torch.exp((x - top[:, None]) / temperature[:, None]) if from_logits else x
    return q / twin.race_noise(row_hashes, x.shape[1])


def check(x, top, temperature, row_hashes, from_logits: bool) -> None:
    args = [t.to(DEV) for t in (x, top, temperature, row_hashes)]
    got = kern.race_argmax(*args, from_logits).cpu()
    want = twin.race_argmax(x, top, temperature, row_hashes, from_logits)
    s = scores(x, top, temperature, row_hashes, from_logits)
    best = s.max(dim=-1).values
    # exp and log may differ by an ulp between devices: the same token, unless the row's best two
    # scores are that close, and then a token with the best score.
    second = s.topk(2, dim=-1).values[:, 1]
    clear = second < best * (1 - 1e-5)
    assert torch.equal(got[clear], want[clear])
    assert torch.all(s.gather(1, got[:, None])[:, 0] >= best * (1 - 1e-5))


@pytest.mark.parametrize("vocab", [1000, 20011])
def test_noise_is_the_twins_bit_for_bit(vocab):
    """q = 1 everywhere: the winner is the column with the largest 24-bit u, so any difference in the
    hashes shows as another token."""
    rows = 5
    row_hashes = hashes(rows, 11)
    ones = torch.ones(rows, vocab)
    got = kern.race_argmax(ones.to(DEV), ones[:, 0].to(DEV), ones[:, 0].to(DEV), row_hashes.to(DEV), False)
    want = twin.race_argmax(ones, ones[:, 0], ones[:, 0], row_hashes, False)
    assert got.cpu().tolist() == want.tolist()


@pytest.mark.parametrize("from_logits", [True, False])
def test_draw_matches_twin(from_logits):
    x, top, temperature, row_hashes = inputs(4, 9000, seed=3)
    if not from_logits:  # truncated probabilities: zeros where the sampler cut
        x = torch.exp((x - top[:, None]) / temperature[:, None])
        x[:, 1::5] = 0.0
    check(x, top, temperature, row_hashes, from_logits)


def test_rows_of_zeros_and_strided_rows():
    """A row whose q is all zero draws token 0, as torch's argmax (the first of equal maxima); rows of a
    wider tensor (the sampler's logits may be a view) are read through their stride."""
    x, top, temperature, row_hashes = inputs(3, 3000, seed=5)
    wide = torch.zeros(3, 3500)
    wide[:, :3000] = torch.exp((x - top[:, None]) / temperature[:, None])
    wide[1] = 0.0
    view = wide[:, :3000]
    got = kern.race_argmax(view.to(DEV), top.to(DEV), temperature.to(DEV), row_hashes.to(DEV), False).cpu()
    assert got[1] == 0
    check(view, top, temperature, row_hashes, False)


@pytest.mark.gpu
def test_full_vocabulary_batch_256_gpu():
    x, top, temperature, row_hashes = inputs(256, 151936, seed=7)
    check(x, top, temperature, row_hashes, True)


def test_noise_is_never_zero_and_takes_23_bits():
    """u = 1 (e = 0) cannot occur: the largest 23-bit value plus a half is exact in fp32, and so is
    every u; the smallest e is -log(1 - 2^-24)."""
    bits = torch.tensor([0, 1, (1 << 23) - 1], dtype=torch.float32)
    u = (bits + 0.5) * 2.0**-23
    assert u.max() < 1 and u.min() > 0 and torch.equal(u * 2.0**23 - 0.5, bits)
    row_hashes = hashes(64, 17)
    e = twin.race_noise(row_hashes, 4096)
    assert e.min() > 0 and e.min() >= -torch.log(torch.tensor(1 - 2.0**-24))
