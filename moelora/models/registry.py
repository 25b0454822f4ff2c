"""Model families by Hugging Face `architectures` name: the one place a new family is registered."""

from __future__ import annotations

from collections.abc import Sequence

from moelora.models import (
    deepseek_v2,
    deepseek_v3,
    glm4_moe,
    gpt_oss,
    mixtral,
    olmoe,
    qwen2_moe,
    qwen3_5_moe,
    qwen3_moe,
    qwen3_next,
)
from moelora.models.family import Family

FAMILIES: tuple[Family, ...] = (
    qwen3_moe.FAMILY,
    qwen2_moe.FAMILY,
    mixtral.FAMILY,
    olmoe.FAMILY,
    glm4_moe.FAMILY,
    deepseek_v3.FAMILY,
    deepseek_v2.FAMILY,
    gpt_oss.FAMILY,
    qwen3_next.FAMILY,
    qwen3_5_moe.FAMILY,
    qwen3_5_moe.MULTIMODAL,
)
_BY_ARCHITECTURE = {arch: fam for fam in FAMILIES for arch in fam.architectures}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one moelora implements."""


def supported_architectures() -> list[str]:
    return sorted(_BY_ARCHITECTURE)


def family_for(architectures: Sequence[str] | None, where: str) -> Family:
    """The family of the first architecture moelora knows; an error listing the supported ones if none."""
    for arch in architectures or ():
        if arch in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[arch]
    found = ", ".join(architectures) if architectures else "no 'architectures' entry"
    raise UnsupportedModelError(
        f"{where} declares {found}; moelora supports {', '.join(supported_architectures())}"
    )
