"""The issue-15 benchmark scripts run and report what their tables claim (small settings)."""

from __future__ import annotations

from perf import prefix_routing, spec_exactness


def test_prefix_routing_reuses_and_matches_the_cold_engine():
    row = prefix_routing.run(prefix_routing._gqa_model(), conversations=2, turns=2, add=8, new=4, reps=1)
    assert row["equal"] is True
    # turn 2 (8 + 4 + 8 ids) reuses turn 1's prompt and answer but the row's last two positions
    assert row["samples"] == 2 and row["reused"] == (8 + 4 - 2) / 20


def test_spec_exactness_default_engine_takes_plain_steps_on_accuracy_level_4():
    row = spec_exactness.run_level(4, layers=1, vocab=4096, requests=1, new=12, seed=0)
    assert "accuracy_level 4" in row["coarse"]
    assert row["default_equal"] is True and row["default_drafts"] is False
    zero = spec_exactness.run_level(0, layers=1, vocab=4096, requests=1, new=12, seed=0)
    assert zero["coarse"] == "-" and zero["default_drafts"] is True
    assert zero["parted"] == "0 of 1" and zero["default_equal"] is True
