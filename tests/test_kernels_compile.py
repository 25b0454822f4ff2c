"""Every Triton kernel compiles for the GPU (sm_90, bf16, shipped tiles): see tests/kernel_compile.py.

A subprocess, since this suite's conftest turns Triton's interpreter on, and compiling needs it off.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def test_every_kernel_compiles_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "-m", "tests.kernel_compile"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]


def test_every_kernel_is_in_the_compile_list():
    """Each `@triton.jit` kernel of moelora.ops.triton (the launched ones, named `_..._kernel`) has a case
    in tests/kernel_compile.py: a kernel missing there is compiled first on a GPU, where a type error the
    interpreter accepts (a name rebound to another shape in a branch) ends a device session."""
    import importlib
    import pkgutil

    import moelora.ops.triton as package
    from tests.kernel_compile import all_cases

    def key(kernel: object) -> str:  # a JITFunction, or the interpreter's InterpretedFunction of it
        fn = kernel.fn  # type: ignore[attr-defined]
        return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"

    kernels = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, value in vars(module).items():
            if name.endswith("_kernel") and callable(getattr(value, "fn", None)):
                kernels.add(key(value))
    assert len(kernels) > 20  # (the search itself works)
    assert kernels - {key(case[0]) for case in all_cases()} == set()
