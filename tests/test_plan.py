"""`MOELORA_PLAN`: a process's kernel plan with some scalar fields changed (`plan.with_overrides`), so a
variant can be timed in the whole model; read once at import, refused with a message naming the item."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from moelora import ops
from moelora.ops.plan import TUNED, KernelPlan, use_plan, with_overrides


def test_overrides_reach_nested_fields_and_leave_the_rest():
    plan = with_overrides(
        KernelPlan(), "linear_tiles.programs_per_sm=3; decode_tiles.fp8_block_k=256, decode_pairs=16"
    )
    assert plan.linear_tiles.programs_per_sm == 3 and plan.decode_tiles.fp8_block_k == 256
    assert plan.decode_pairs == 16
    assert plan.linear_tiles.block_n == TUNED.linear_tiles.block_n
    assert (
        plan.decode_down_tiles == KernelPlan().decode_down_tiles and plan.moe_table == KernelPlan().moe_table
    )
    assert with_overrides(KernelPlan(), "fp8_activation_rows=None").fp8_activation_rows is None
    assert (
        with_overrides(KernelPlan(), "fp8_activation_rows=4").fp8_activation_rows == 4
    )  # an int for a float
    assert with_overrides(KernelPlan(), " ; ") == KernelPlan()
    # tiles that may be None (their shape rule's choice) can be set to None, and reached while set
    assert with_overrides(KernelPlan(), "fp8_linear_tiles=None").fp8_linear_tiles is None
    assert with_overrides(KernelPlan(), "fp8_linear_tiles.stages=3").fp8_linear_tiles.stages == 3


def test_pdl_off_names_the_launches_that_wait_for_the_kernel_before():
    """`pdl_off`: launches (space-separated names) that are not programmatic dependents while `pdl` is on;
    q/k/v with the input norm inside by default, none once set to ''."""
    plan = with_overrides(KernelPlan(pdl=True), "pdl_off='attention down'")
    assert not plan.pdl_for("attention") and not plan.pdl_for("down")
    assert plan.pdl_for("norm_linear") and plan.pdl_for("linear") and plan.pdl_for("gate_up")
    assert not KernelPlan(pdl=True).pdl_for("norm_linear") and KernelPlan(pdl=True).pdl_for("linear_router")
    assert with_overrides(KernelPlan(pdl=True), "pdl_off=''").pdl_for("norm_linear")
    assert not any(KernelPlan(pdl=False).pdl_for(name) for name in ("linear", "attention"))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope=1", "KernelPlan has no field 'nope'; it has align_one_launch, attn_decode_tiles"),
        ("linear_tiles.x=1", "LinearTiles has no field 'x'"),
        ("decode_pairs", "expected path=value"),
        ("expand_16bit=abc", "'abc' is not a Python literal"),
        ("pdl=1", "pdl takes a bool, not 1"),
        ("linear_tiles.block_n=1.5", "block_n takes an int, not 1.5"),
        ("linear_tiles.block_n=True", "block_n takes an int, not True"),
        ("moe_table=1", "only scalar fields"),
        ("linear_tiles=None", "only scalar fields"),  # tiles that must be there
        ("fp8_linear_tiles=None; fp8_linear_tiles.stages=3", "'fp8_linear_tiles' has no fields"),
        ("decode_pairs.x=1", "'decode_pairs' has no fields"),
        (
            "pdl_off='attention o_proj'",
            "KernelPlan.pdl_off: no launch 'o_proj'; the launches are attention, down",
        ),
    ],
)
def test_bad_overrides_are_refused_by_name(spec: str, message: str):
    with pytest.raises(ValueError, match="MOELORA_PLAN item") as err:
        with_overrides(KernelPlan(), spec)
    assert message in str(err.value)


def test_the_environment_sets_the_process_plan():
    code = "from moelora.ops.plan import TUNED; print(TUNED.decode_pairs)"
    env = {**os.environ, "MOELORA_PLAN": "decode_pairs=3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["3"]
    env["MOELORA_PLAN"] = "decode_pairs=x"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "MOELORA_PLAN item 'decode_pairs=x'" in bad.stderr


def test_use_plan_changes_the_plan_every_op_takes_and_restores_it():
    """`use_plan` (`bench latency --plan-variants`): the ops' default plan is TUNED itself, changed in
    place, so the next call of any op takes the new plan; "" gives back the start plan; a bad spec changes
    nothing."""
    default = inspect.signature(ops.fuses_rotary_decode).parameters["plan"].default
    start = replace(TUNED)  # a copy
    try:
        plan = use_plan("rotary_in_decode=False, linear_tiles.stages=3")
        assert plan is TUNED and default is TUNED
        assert default.rotary_in_decode is False and default.linear_tiles.stages == 3
        assert inspect.signature(ops.linear).parameters["plan"].default.linear_tiles.stages == 3
        use_plan("decode_pairs=5")  # each spec starts again from the start plan
        assert TUNED.decode_pairs == 5 and TUNED.rotary_in_decode == start.rotary_in_decode
        with pytest.raises(ValueError, match="MOELORA_PLAN item 'nope=1'"):
            use_plan("nope=1")
        assert TUNED.decode_pairs == 5
    finally:
        use_plan("")
    assert start == TUNED
