"""The patch a stage uses: the plan's unless a setting overrides it, and an override that differs from the plan is
said in one line."""

import pytest

from dints3d.data.patch import resolve_patch
from dints3d.utils.errors import DintsError

PLAN = {"patch_size": [64, 64, 32]}


def test_the_plan_decides_unless_a_setting_does_and_a_difference_is_said_once():
    said = []
    assert resolve_patch(PLAN, 32, "the dints space", ("data.patch_size", None), note=said.append) == [64, 64, 32]
    assert said == []
    assert resolve_patch(PLAN, 32, "the dints space", ("data.patch_size", [64, 64, 32]), note=said.append) == [64, 64,
                                                                                                              32]
    assert said == []  # the same as the plan: nothing to say
    assert resolve_patch(PLAN, 32, "the dints space", ("train.patch_size", [96, 96, 96]), ("data.patch_size", [32] * 3),
                         note=said.append) == [96, 96, 96]
    assert said == ["note: patch [96, 96, 96] from train.patch_size, not the plan's [64, 64, 32] (plan.json: what "
                    "`dints3d prepare` chose for the task)"]
    assert resolve_patch(PLAN, 32, "x", ("data.patch_size", [96, 96, 96]), note=None) == [96, 96, 96]


def test_a_plan_patch_the_network_cannot_take_is_refused():
    with pytest.raises(DintsError, match=r"data.patch_size: \[64, 64, 32\] must have 3 sides, each a positive multiple "
                                         r"of 64"):
        resolve_patch(PLAN, 64, "the dints space", ("data.patch_size", None))
