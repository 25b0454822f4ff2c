"""Placement and loading rules of one rank, checked in one process (building and loading a rank's share
needs no collective): which experts and slices a rank reads, holds and fills with adapter weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from moelora.loader.checkpoint import Checkpoint
from moelora.loader.model_loader import load_model, read_model_config
from moelora.lora.adapter import read_adapter
from moelora.lora.pool import LoraPool, pool_bytes
from moelora.parallel.sharding import place_experts
from moelora.parallel.state import ParallelState
from tests.hf_models import save_fused
from tests.lora_files import write_adapter

MOE_LAYERS = (0, 2)  # qwen3_moe test model: layer 1 is dense


def rank_model(folder: Path, tp: int, ep: int, rank: int) -> Any:
    return load_model(folder, dtype="float32", device="cpu", ps=ParallelState(rank, tp, ep), progress=False)


@pytest.fixture(scope="module")
def fused_ckpt(hf_models, tmp_path_factory) -> Path:
    return save_fused(hf_models["qwen3_moe"], tmp_path_factory.mktemp("fused") / "qwen3_moe")


def write_sparse_adapter(folder: Path, hf: Any, experts: list[int]) -> Any:
    return write_adapter(
        folder, "qwen3_moe", hf.config, form="per_expert", rank=4, alpha=8.0, seed=3, experts=experts
    )


def test_sparse_adapter_fills_only_the_rank_s_experts(hf_models, checkpoints, tmp_path: Path):
    """8 experts, ep=4: rank 2 owns global 4 and 5, so adapter experts {1, 4, 5, 7} land in local 0 and 1;
    an adapter of experts {4, 5} gives rank 0 (experts 0 and 1) zeros, not an error."""
    hf = hf_models["qwen3_moe"]
    cfg, family = read_model_config(checkpoints["qwen3_moe"])
    expected = write_sparse_adapter(tmp_path / "a", hf, [1, 4, 5, 7])
    adapter = read_adapter("a", tmp_path / "a", cfg, family)
    model = rank_model(checkpoints["qwen3_moe"], 4, 4, 2)
    pool = LoraPool(model, 2, 4)
    pool.write(1, adapter)
    for layer in MOE_LAYERS:
        lora = model.decoder_layers()[layer].mlp.experts.lora
        assert lora.a_gu.shape[1] == 2  # buffers for the two local experts only
        for local, glob in ((0, 4), (1, 5)):
            for half, proj in enumerate(("gate", "up")):
                A, B, s = expected.experts[(layer, proj, glob)]
                assert torch.equal(lora.a_gu[1, local, half], A)
                torch.testing.assert_close(lora.b_gu[1, local, half], s * B, rtol=1e-6, atol=0)
            A, B, s = expected.experts[(layer, "down", glob)]
            assert torch.equal(lora.a_dn[1, local], A)
            torch.testing.assert_close(lora.b_dn[1, local], s * B, rtol=1e-6, atol=0)
        assert not lora.a_gu[0].any()  # the other slot untouched
        assert lora.rank.tolist() == [0, 4]  # the slot's rank, which the kernels read up to
    qkv = model.decoder_layers()[0].self_attn.qkv.lora
    assert qkv.rank[0].tolist() == [0, 0, 0]
    parts = ("q_proj", "k_proj", "v_proj")
    assert qkv.rank[1].tolist() == [4 if (0, n) in adapter.dense else 0 for n in parts]
    assert qkv.rank[1].any()
    pool.clear(1)
    assert not qkv.rank.any() and not model.decoder_layers()[0].mlp.experts.lora.rank.any()

    write_sparse_adapter(tmp_path / "b", hf, [4, 5])
    other = read_adapter("b", tmp_path / "b", cfg, family)
    rank0 = rank_model(checkpoints["qwen3_moe"], 4, 4, 0)
    pool0 = LoraPool(rank0, 2, 4)
    pool0.write(0, other)
    for layer in MOE_LAYERS:
        lora = rank0.decoder_layers()[layer].mlp.experts.lora
        assert not any(t[0].any() for t in (lora.a_gu, lora.b_gu, lora.a_dn, lora.b_dn))
        assert lora.rank[0] == 0  # none of this rank's experts: its rank here is 0, nothing to read
    # The adapter's attention LoRA still reaches rank 0 (it is not expert-local).
    assert rank0.decoder_layers()[0].self_attn.qkv.lora.a[0].any()


def test_moe_tp_splits_expert_lora_like_the_base_weight(hf_models, checkpoints, tmp_path: Path):
    """tp=4, ep=2: rank 3 is EP rank 1 (experts 4..7), MoE-TP rank 1 (intermediate rows 8..15 of 16)."""
    hf = hf_models["qwen3_moe"]
    cfg, family = read_model_config(checkpoints["qwen3_moe"])
    expected = write_sparse_adapter(tmp_path / "a", hf, list(range(8)))
    model = rank_model(checkpoints["qwen3_moe"], 4, 2, 3)
    pool = LoraPool(model, 1, 4)
    pool.write(0, read_adapter("a", tmp_path / "a", cfg, family))
    lora = model.decoder_layers()[2].mlp.experts.lora
    rows = slice(8, 16)
    for local in range(4):
        A, B, s = expected.experts[(2, "gate", 4 + local)]
        assert torch.equal(lora.a_gu[0, local, 0], A)  # column-parallel: A whole
        torch.testing.assert_close(lora.b_gu[0, local, 0], s * B[rows], rtol=1e-6, atol=0)  # B rows split
        A, B, s = expected.experts[(2, "down", 4 + local)]
        assert torch.equal(lora.a_dn[0, local], A[:, rows])  # row-parallel: A columns split
        torch.testing.assert_close(lora.b_dn[0, local], s * B, rtol=1e-6, atol=0)


def test_fused_checkpoint_gives_each_rank_its_expert_slices(hf_models, fused_ckpt: Path):
    hf_experts = hf_models["qwen3_moe"].model.layers[2].mlp.experts
    inter = hf_experts.down_proj.shape[-1]
    model = rank_model(fused_ckpt, 4, 2, 2)  # EP rank 1 (experts 4..7), MoE-TP rank 0 (rows 0..7)
    moe = model.decoder_layers()[2].mlp.experts
    cols = slice(0, inter // 2)
    gate, up = hf_experts.gate_up_proj[4:8, :inter], hf_experts.gate_up_proj[4:8, inter:]
    assert torch.equal(moe.w_gate_up, torch.cat([gate[:, cols], up[:, cols]], dim=1))
    assert torch.equal(moe.w_down, hf_experts.down_proj[4:8, :, cols])


@pytest.mark.parametrize("fused", [False, True])
def test_a_rank_reads_only_what_it_owns(checkpoints, fused_ckpt: Path, monkeypatch, fused: bool):
    reads: list[tuple[str, tuple[slice, ...]]] = []
    original = Checkpoint.read

    def recording(self: Checkpoint, key: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        reads.append((key, index))
        return original(self, key, index)

    monkeypatch.setattr(Checkpoint, "read", recording)
    rank_model(fused_ckpt if fused else checkpoints["qwen3_moe"], 4, 4, 3)  # owns experts 6 and 7
    expert_reads = [(k, i) for k, i in reads if ".experts." in k]
    assert expert_reads
    if fused:
        for key, index in expert_reads:
            assert index and index[0] == slice(6, 8), (key, index)
    else:
        owned = {f".experts.{e}." for e in (6, 7)}
        assert all(any(o in k for o in owned) for k, _ in expert_reads), expert_reads


def test_a_2d_tensor_where_3d_is_expected(fused_ckpt: Path, tmp_path: Path):
    import shutil

    folder = tmp_path / "bad"
    shutil.copytree(fused_ckpt, folder)
    state = load_file(str(folder / "model.safetensors"))
    key = "model.layers.0.mlp.experts.down_proj"
    state[key] = state[key].flatten(0, 1)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"'{key}'.* has shape \[256, 16\].* expects \[8, 32, 16\]"):
        rank_model(folder, 2, 2, 1)


@pytest.mark.parametrize(("tp", "ep"), [(1, 1), (2, 2), (4, 2), (4, 4)])
def test_each_rank_holds_exactly_its_share(checkpoints, tp: int, ep: int):
    cfg, _ = read_model_config(checkpoints["qwen3_moe"])
    hidden, inter, experts, slots, rank_ = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, 3, 4
    moe_tp = tp // ep
    for rank in range(tp):
        model = rank_model(checkpoints["qwen3_moe"], tp, ep, rank)
        pool = LoraPool(model, slots, rank_)
        e_loc = experts // ep
        i_loc = inter // moe_tp
        for layer in MOE_LAYERS:
            moe = model.decoder_layers()[layer].mlp.experts
            weight_bytes = sum(t.numel() * t.element_size() for t in (moe.w_gate_up, moe.w_down))
            assert weight_bytes == e_loc * 3 * i_loc * hidden * 4
            lora = moe.lora
            lora_bytes = sum(
                t.numel() * t.element_size() for t in (lora.a_gu, lora.b_gu, lora.a_dn, lora.b_dn)
            )
            assert lora_bytes == slots * e_loc * rank_ * (2 * hidden + 2 * i_loc + i_loc + hidden) * 4
        assert pool.num_bytes == pool_bytes(model, slots, rank_)


def test_a_rank_reads_only_its_experts_adapter_tensors(hf_models, checkpoints, tmp_path: Path, monkeypatch):
    """EP rank 2 of 4 (experts 4, 5) reads the dense tensors and experts 4 and 5 of a per-expert adapter,
    nothing of the other experts; an adapter touching only other experts gives it nothing, not an error."""
    from safetensors import safe_open

    hf = hf_models["qwen3_moe"]
    cfg, family = read_model_config(checkpoints["qwen3_moe"])
    write_sparse_adapter(tmp_path / "a", hf, [1, 4, 5, 7])
    owns = place_experts(8, 4, 2).owns
    full = read_adapter("a", tmp_path / "a", cfg, family)
    reads: list[str] = []
    original = safe_open

    class Recording:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.inner = original(*args, **kwargs)

        def __enter__(self) -> Recording:
            self.inner.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.__exit__(*exc)

        def keys(self) -> list[str]:
            return list(self.inner.keys())

        def get_tensor(self, key: str) -> torch.Tensor:
            reads.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr("moelora.lora.adapter.safe_open", Recording)
    mine = read_adapter("a", tmp_path / "a", cfg, family, owns_expert=owns)
    assert reads and not [k for k in reads if any(f".experts.{e}." in k for e in (1, 7))]
    assert mine.dense.keys() == full.dense.keys()
    for key, per_expert in full.experts.items():
        assert sorted(mine.experts.get(key, {})) == [e for e in sorted(per_expert) if owns(e)]
        for e, w in mine.experts.get(key, {}).items():
            assert torch.equal(w.A, per_expert[e].A) and torch.equal(w.B, per_expert[e].B)

    write_adapter(tmp_path / "b", "qwen3_moe", hf.config, form="per_expert", rank=4, alpha=8.0, seed=3,
                  experts=[0, 7], dense_targets=())  # fmt: skip
    other = read_adapter("b", tmp_path / "b", cfg, family, owns_expert=owns)
    assert not other.dense and not any(other.experts.values())
