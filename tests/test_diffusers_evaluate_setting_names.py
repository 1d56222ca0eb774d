"""evaluate's results folders: one per distinct gate scale (issue 27: 1.0000001 and 1.0000002 shared one)."""

from diffusers_ext.evaluation.evaluate import _setting_name


def test_gate_scales_differing_in_the_7th_digit_get_their_own_folders():
    assert _setting_name(1.0000001) == "gate_1.0000001"
    assert _setting_name(1.0000002) == "gate_1.0000002"


def test_short_names_stay_where_they_read_back_exactly():
    assert [_setting_name(s) for s in (None, 1.0, 0.5, 2.0, 1e-7)] == [
        "baseline",
        "gate_1",
        "gate_0.5",
        "gate_2",
        "gate_1e-07",
    ]


def test_every_name_reads_back_as_its_own_value():
    scales = [1.0, 1.0000001, 1.0000002, 0.1 + 0.2, 0.3, 1 / 3, 2.5e6, 123456.7, 1e-7, 1.00000000000001]
    names = [_setting_name(s) for s in scales]
    assert len(set(names)) == len(scales)
    assert [float(n.removeprefix("gate_")) for n in names] == scales
