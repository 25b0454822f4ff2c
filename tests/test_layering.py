"""The package import graph of moelora: no cycles, and no package imports one above it.

The floors, lowest first, are written once, here. A module may import its own floor and any floor below;
`if TYPE_CHECKING:` imports count too (they are the same dependency, only deferred), and so do imports
inside functions (a function-local import is how a back stair hides).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import moelora

ROOT = Path(moelora.__file__).resolve().parent

# Lowest first. A package is a directory (`moelora/engine`) or a top-level module (`moelora/llm.py`).
FLOORS: list[set[str]] = [
    {"config", "sampling_params", "outputs"},
    {"parallel"},
    {"ops"},
    {"batch", "cache"},
    {"layers"},
    {"models"},
    {"demo", "loader", "generation_config"},
    {"lora"},
    {"engine"},
    {"llm"},
    {"server", "benchmark", "flags"},
    {"cli"},
]
LEVEL = {name: i for i, floor in enumerate(FLOORS) for name in floor}


def package_of(module: str) -> str | None:
    """`moelora.engine.runner` -> `engine`; None for modules outside moelora and for `moelora` itself."""
    parts = module.split(".")
    if parts[0] != "moelora" or len(parts) < 2:
        return None
    return parts[1]


def imports(path: Path) -> set[str]:
    """Every moelora module `path` imports, anywhere in it."""
    rel = path.relative_to(ROOT.parent).with_suffix("")
    here = list(rel.parts if rel.name != "__init__" else rel.parts[:-1])
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + (1 if rel.name == "__init__" else 0)]
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)  # `from moelora import llm`
    return {m for m in out if m.startswith("moelora")}


def edges() -> dict[tuple[str, str], str]:
    """(importer package, imported package) -> one file that makes the edge."""
    out: dict[tuple[str, str], str] = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        src = rel.parts[0].removesuffix(".py")
        if src == "__init__":
            continue  # the package's face re-exports from every floor
        for module in imports(path):
            dst = package_of(module)
            if dst is not None and dst != src and dst in LEVEL:
                out.setdefault((src, dst), str(rel))
    return out


def test_every_package_has_a_floor():
    packages = {p.stem for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    packages.discard("__init__")
    assert packages - set(LEVEL) == set(), "give these packages a floor in FLOORS"
    assert set(LEVEL) - packages == set(), "these floors name packages that no longer exist"


def test_no_package_imports_a_higher_floor():
    upward = [
        f"{src} (floor {LEVEL[src]}) imports {dst} (floor {LEVEL[dst]}) in {where}"
        for (src, dst), where in sorted(edges().items())
        if LEVEL[dst] > LEVEL[src]
    ]
    assert upward == []


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for src, dst in edges():
        graph.setdefault(src, set()).add(dst)
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt] if nxt in stack else [*stack, nxt]
            if nxt not in state and (cycle := visit(nxt, [*stack, nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            raise AssertionError(" -> ".join(cycle))


def module_values(path: Path) -> dict[str, ast.expr]:
    """Names a module binds at its top level to a value (not a function, class or import)."""
    out: dict[str, ast.expr] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and node.value is not None:
            out.update({t.id: node.value for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and node.value is not None and isinstance(node.target, ast.Name):
            out[node.target.id] = node.value
    return out


def test_kernel_choices_are_a_value_not_module_state():
    """Kernel choices live in one frozen `KernelPlan` passed to the ops: the rules' module holds no
    values (a switch there would be read at call time and patched by benchmarks), no op module keeps an
    override (a top-level None) or rebinds a global, and every plan type is frozen."""
    ops_dir = ROOT / "ops"
    assert set(module_values(ops_dir / "triton" / "tiles.py")) <= {"__all__"}
    for path in sorted(ops_dir.rglob("*.py")):
        for name, value in module_values(path).items():
            assert not (isinstance(value, ast.Constant) and value.value is None), (
                f"{path.name}: {name} = None"
            )
        tree = ast.walk(ast.parse(path.read_text()))
        rebound = {name for n in tree if isinstance(n, ast.Global) for name in n.names}
        # the one exception: the process's backend, set from configuration by `ops.use_backend`
        assert rebound <= ({"_BACKEND"} if path == ops_dir / "__init__.py" else set()), path.name
    from moelora.ops import plan

    types = [plan.Tiles, plan.DecodeTiles, plan.LoraTiles, plan.KernelPlan]
    assert all(t.__dataclass_params__.frozen for t in types)  # type: ignore[attr-defined]
    public = {n for n in module_values(ops_dir / "plan.py") if not n.startswith("_")}
    assert public == {"TUNED"}


def test_kernels_guard_slots_through_one_helper():
    """Adapter-slot ids are range-checked in one place (`common.valid_slot`), not by a copy per kernel."""
    copies = [
        p.name
        for p in sorted((ROOT / "ops" / "triton").glob("*.py"))
        if p.name != "common.py" and re.search(r">= 0\) & \(\w+ < num_slots\)", p.read_text())
    ]
    assert copies == []
