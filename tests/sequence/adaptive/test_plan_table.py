"""Plan.table explains the MILP gap where it prints it."""

import dataclasses

from heddle.sequence.adaptive import CostModel, plan_batch


def test_gap_is_explained():
    plan = plan_batch([64, 128, 256, 512] * 4, num_devices=4, cost_model=CostModel.preset("a100-80g-ib"),
                      solver="greedy")
    assert "MILP gap" not in plan.table()  # greedy: no gap
    text = dataclasses.replace(plan, gap=0.72).table()
    assert "MILP gap 72%: the solver's proven lower bound was 72% below its best solution" in text
    assert "not this plan's distance from the optimum" in text
    assert "no lower bound" in dataclasses.replace(plan, gap=float("inf")).table()
