"""Manual patch schedules: parsing and clear errors."""
import pytest

from comfyui_dynamic_dit.methods.patch_scheduler.schedule import ScheduleRange, parse_schedule, schedule_range_at


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


def test_schedule_range_at():
    schedule = parse_schedule("0-40%:4, 50-70%:2")
    assert schedule_range_at(schedule, 0.0).factor == 4 and schedule_range_at(schedule, 39.9).factor == 4
    assert schedule_range_at(schedule, 40.0) is None and schedule_range_at(schedule, 70.0) is None
