from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.hf_models import FAMILIES, build_hf_model, save_per_expert

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def hf_models() -> dict[str, Any]:
    """One random transformers model per family (fp32, eager), built once per session."""
    return {f: build_hf_model(f) for f in FAMILIES}


@pytest.fixture(scope="session")
def checkpoints(hf_models: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each family's model saved the way transformers saves it (per-expert keys)."""
    root = tmp_path_factory.mktemp("ckpt")
    return {f: save_per_expert(m, root / f) for f, m in hf_models.items()}
