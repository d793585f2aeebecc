"""The planner against what a GPU measured (shared/plan/measured.json: `edittuner doctor --full` and
`bench/gpu_step.py` on an NVIDIA H200): every measured run is predicted to need at least the memory it used, and at
most 15% more; its seconds per step within 15%; and the 24 GiB cap the planner says nf4-bnb fits under held it."""

from __future__ import annotations

import pytest

from shared.plan.report import measured_runs
from shared.plan.step import planned

GiB = 2**30
ROWS = measured_runs()["rows"]


def _plan(row):
    return planned(
        row["precision"],
        flavour=row["flavour"],
        resolution=row["resolution"],
        references=row["references"],
        checkpointing=row["checkpointing"],
        gpu="H200",
    )


@pytest.mark.parametrize(
    "row", [r for r in ROWS if r["cap_gib"] is None], ids=lambda r: f"{r['precision']}-{r['flavour']}-{r['resolution']}"
)
def test_prediction_covers_what_the_gpu_used(row) -> None:
    plan = _plan(row)
    assert plan.tokens.total == row["tokens"]  # the same run, token for token
    predicted = plan.trainer.total / GiB
    used = row["device_used_gib"] or row["reserved_gib"] + 0.75  # gpu_step reads torch's peaks: + the context
    assert used <= predicted <= 1.15 * used, (predicted, row)
    assert plan.seconds_per_step == pytest.approx(row["s_per_step"], rel=0.15)


def test_the_24_gib_card_claim_held_under_a_cap() -> None:
    capped = [r for r in ROWS if r["cap_gib"] == 24.0]
    assert capped, "measured.json holds the capped run"
    for row in capped:
        plan = _plan(row)
        assert plan.trainer.total <= 24 * GiB  # what the planner says
        assert row["reserved_gib"] <= 24.0 and row["s_per_step"] > 0  # what the card did


def test_docs_table_shows_the_measurements() -> None:
    from shared.plan.report import docs_table

    table = docs_table()
    for row in ROWS:
        if row["cap_gib"] is None and row["precision"] in ("no_change", "int8-quanto", "nf4-bnb"):
            mem = (
                f"{row['device_used_gib']:.1f} GiB used"
                if row["device_used_gib"] is not None
                else f"{row['reserved_gib']:.1f} GiB reserved"
            )
            assert f"{mem}, {row['s_per_step']:.2f} s (H200)" in table
