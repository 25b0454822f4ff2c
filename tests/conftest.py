from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernel tests run in Triton's interpreter. triton.jit reads this flag when
    # triton.language is imported, which the imports below already do (peft -> torch._dynamo), so it is
    # set first. Nothing else on CPU runs Triton code.
    os.environ.setdefault("TRITON_INTERPRET", "1")


from tests.hf_models import FAMILIES, build_hf_model, save_per_expert
from tests.lora_files import ExpectedLora, adapter_specs, write_adapter


def _gpu_dot_rule(lhs_type: Any, rhs_type: Any) -> tuple[int, int, int]:
    """The smallest dot Triton compiles for an NVIDIA GPU, [M, N, K]: K >= 16 (32 for 8-bit inputs)."""
    return (1, 1, 32) if lhs_type.scalar.primitive_bitwidth == 8 else (1, 1, 16)


def _interpreter_refuses_what_the_gpu_refuses() -> None:
    """Triton's interpreter accepts a `tl.dot` of any size; the GPU compiler refuses K < 16, and a kernel
    launched with such a tile (a head dim of 8) passed every CPU test and failed on the H200. Give the
    interpreter the GPU's rule, so CPU tests fail where the GPU would."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = interpreter.InterpreterBuilder
    original = builder.__init__

    def init(self: Any) -> None:
        original(self)
        self.codegen_fns["min_dot_size"] = _gpu_dot_rule

    builder.__init__ = init  # type: ignore[method-assign]
    for existing in (getattr(interpreter, "interpreter_builder", None),):
        if existing is not None:
            existing.codegen_fns["min_dot_size"] = _gpu_dot_rule


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_refuses_what_the_gpu_refuses()


torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--part",
        default=None,
        help="i/n: run only the i-th of n contiguous parts of the selected tests (1-based), so that a long "
        "run (the GPU suite on a cold Triton cache) fits a time limit per call: --part 1/3, 2/3, 3/3",
    )


@pytest.hookimpl(trylast=True)  # after `-m` and `-k` have deselected theirs
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _keep_part(config, items)
    _skip_what_this_machine_lacks(items)


def _keep_part(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`--part i/n`: deselect every test outside the i-th of n contiguous, near-equal parts (in collection
    order, so a file's tests stay together and share their fixtures and compiled kernels)."""
    part = config.getoption("--part")
    if part is None:
        return
    try:
        i, n = (int(v) for v in part.split("/"))
    except ValueError:
        raise pytest.UsageError(f"--part {part!r}: expected i/n, such as 2/3") from None
    if not 1 <= i <= n:
        raise pytest.UsageError(f"--part {part!r}: i must be in [1, n]")
    start, stop = (i - 1) * len(items) // n, i * len(items) // n
    config.hook.pytest_deselected(items=items[:start] + items[stop:])
    items[:] = items[start:stop]


def _skip_what_this_machine_lacks(items: list[pytest.Item]) -> None:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        if "gpu" in item.keywords and gpus == 0:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        marker = item.get_closest_marker("multigpu")
        if marker is not None and gpus < marker.args[0]:
            item.add_marker(pytest.mark.skip(reason=f"needs {marker.args[0]} CUDA GPUs, {gpus} present"))
        if item.get_closest_marker("cuda_graphs") and os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1":
            # Capture takes its memory from the caching allocator; with it off (as for compute-sanitizer)
            # every allocation is a cudaMalloc, which stream capture forbids.
            item.add_marker(pytest.mark.skip(reason="CUDA graphs need the caching allocator"))


@pytest.fixture(scope="session")
def hf_models() -> dict[str, Any]:
    """One random transformers model per family (fp32, eager), built once per session."""
    return {f: build_hf_model(f) for f in FAMILIES}


@pytest.fixture(scope="session")
def checkpoints(hf_models: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each family's model saved the way transformers saves it (per-expert keys)."""
    root = tmp_path_factory.mktemp("ckpt")
    return {f: save_per_expert(m, root / f) for f, m in hf_models.items()}


@pytest.fixture(scope="session")
def mixed_adapters(
    hf_models: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, tuple[Path, ExpectedLora]]]:
    """family -> the three adapters of `adapter_specs` (ranks 4, 8, 16; one covering half the experts)."""
    out: dict[str, dict[str, tuple[Path, ExpectedLora]]] = {}
    for family, hf in hf_models.items():
        num_experts = getattr(hf.config, "num_local_experts", None) or hf.config.num_experts
        root = tmp_path_factory.mktemp(f"adapters-{family}")
        out[family] = {
            name: (root / name, write_adapter(root / name, family, hf.config, **spec))
            for name, spec in adapter_specs(num_experts).items()
        }
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread in this process while a module's multi-process tests run (the workers use one
    each too), so that ranks do not compete for the machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
