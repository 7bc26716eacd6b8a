"""The activation estimates (models.local.activations): measured peaks per model and size, the
most seen; other sizes scaled by pixels with a margin; the family prior until measured."""

from __future__ import annotations

import pytest

from models.local.activations import ActivationMemory, prior_bytes

MB = 1024**2


def test_the_prior_holds_until_the_model_is_measured_then_the_most_seen_per_image() -> None:
    memory = ActivationMemory()
    assert memory.per_image("m", 64, 64, prior_bytes=7) == 7
    memory.record("m", 64, 64, images=4, peak_bytes=40 * MB)
    memory.record("m", 64, 64, images=1, peak_bytes=6 * MB)
    # Per image, the larger of 10 MB (a batch of four) and 6 MB (one alone).
    assert memory.per_image("m", 64, 64, prior_bytes=7) == 10 * MB
    # Another model is not this one.
    assert memory.per_image("other", 64, 64, prior_bytes=7) == 7


def test_an_unmeasured_size_scales_from_the_nearest_measured_one_by_pixels() -> None:
    memory = ActivationMemory()
    memory.record("m", 512, 512, images=1, peak_bytes=100 * MB)
    memory.record("m", 1024, 1024, images=1, peak_bytes=500 * MB)
    # 768x768 is nearer 1024x1024 (by ratio of pixels): 500 MB x 0.5625, with the margin.
    estimate = memory.per_image("m", 768, 768, prior_bytes=1)
    assert 500 * MB * 0.5625 < estimate <= 500 * MB * 0.5625 * 1.15 + 1


def test_images_that_fit_is_at_least_one_and_unbounded_without_a_budget() -> None:
    memory = ActivationMemory()
    memory.record("m", 64, 64, images=1, peak_bytes=10 * MB)
    assert memory.images_that_fit("m", 64, 64, 1, room_bytes=None) is None
    assert memory.images_that_fit("m", 64, 64, 1, room_bytes=35 * MB) == 3
    # One image cannot be split: it is tried as it is (and out-of-memory recovery takes over).
    assert memory.images_that_fit("m", 64, 64, 1, room_bytes=1) == 1


def test_priors_are_for_half_precision_and_double_for_float32() -> None:
    half = prior_bytes(2.5, 1000, 1000, dtype_bytes=2)
    assert half == round(2.5 * 1024**3)
    assert prior_bytes(2.5, 1000, 1000, dtype_bytes=4) == 2 * half


def test_running_out_of_memory_caps_that_size_below_what_failed_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from models.local import activations

    memory = ActivationMemory()
    memory.ran_out("m", 64, 64, images=4)
    # Fewer than failed, whatever the room (the budget misjudged what else holds the device).
    assert memory.images_that_fit("m", 64, 64, 1, room_bytes=10**12) == 3
    assert memory.images_that_fit("m", 64, 64, 1, room_bytes=None) == 3
    memory.ran_out("m", 64, 64, images=1)
    assert memory.images_that_fit("m", 64, 64, 1, room_bytes=10**12) == 1
    # Another size is not capped; and the cap is forgotten after a while.
    assert memory.images_that_fit("m", 32, 32, 1, room_bytes=10) == 10
    monkeypatch.setattr(activations, "_FORGET_RAN_OUT_S", -1.0)  # as if long ago
    assert memory.images_that_fit("m", 64, 64, 1, room_bytes=10**12) == 10**12
