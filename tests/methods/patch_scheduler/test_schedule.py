"""Manual patch schedules: parsing and clear errors."""
import pytest

from comfyui_dynamic_dit.methods.patch_scheduler.schedule import ScheduleRange, parse_schedule, range_of_step
from comfyui_dynamic_dit.methods.patch_scheduler.trainable import coarse_step_indices


def test_parse_schedule():
    assert parse_schedule("0-40%:4, 40-70%:2, 70-100%:1") == (
        ScheduleRange(0, 40, 4), ScheduleRange(40, 70, 2), ScheduleRange(70, 100, 1)
    )
    assert parse_schedule("50%-100%:2x;\n 0 - 25 % : 4") == (ScheduleRange(0, 25, 4), ScheduleRange(50, 100, 2))


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("0-40:4, forty-70:2", "Cannot read 'forty-70:2'"),
        ("40-20%:2", "start before they end"),
        ("0-120%:2", "from 0 to 100%"),
        ("0-50%:3", "must be 1 \\(native\\), 2 or 4, not 3"),
        ("0-50%:4, 40-70%:2", "overlapping ranges: 0-50%:4x and 40-70%:2x"),
    ],
)
def test_bad_schedules_are_explained(text, message):
    with pytest.raises(ValueError, match=message):
        parse_schedule(text)


def test_the_range_of_a_step():
    schedule = parse_schedule("0-40%:4, 50-70%:2")  # step s of N at 100 s / N percent
    assert range_of_step(schedule, 0, 1000).factor == 4 and range_of_step(schedule, 399, 1000).factor == 4
    assert range_of_step(schedule, 400, 1000) is None and range_of_step(schedule, 700, 1000) is None


def test_step_ranges_name_the_same_steps_however_long_the_run():
    schedule = parse_schedule("steps 0-1:4, step 3:2")
    assert schedule == (ScheduleRange(0, 1, 4, by_step=True), ScheduleRange(3, 3, 2, by_step=True))
    for steps in (4, 8, 30):
        assert [getattr(range_of_step(schedule, s, steps), "factor", 1) for s in range(5)] == [4, 4, 1, 2, 1]
    assert schedule[0].describe() == "steps 0-1:4x" and schedule[1].span() == "steps 3-3"
    assert coarse_step_indices(parse_schedule("steps 0-2:2"), 8) == [0, 1, 2]  # what the trainer learns on


@pytest.mark.parametrize(
    "text, message",
    [
        ("steps 3-1:2", "starts before it ends"),
        ("steps 0-1:3", "must be 1 \\(native\\), 2 or 4, not 3"),
        ("steps 0-2:2, steps 2-3:4", "overlapping ranges: steps 0-2:2x and steps 2-3:4x"),
        ("steps 0-1:2, 50-100%:2", "mixes percent ranges and step ranges"),
        ("step one:2", "or steps first-last:factor"),
    ],
)
def test_bad_step_ranges_are_explained(text, message):
    with pytest.raises(ValueError, match=message):
        parse_schedule(text)
