"""Layout validation and rank coordinates (no processes needed)."""

from __future__ import annotations

import pytest

from moekit.config import ConfigError
from moekit.parallel.layout import Layout, expert_slice


def test_no_flags_is_plain_data_parallelism():
    assert Layout.for_world(4) == Layout(dp=4, ep=1, etp=1)
    assert Layout.for_world(4, ep=2, etp=2) == Layout(dp=2, ep=2, etp=2)


@pytest.mark.parametrize(
    ("layout", "world", "experts", "ffn", "field"),
    [
        (Layout(dp=2), 4, 8, 16, "dp x etp"),  # world size mismatch
        (Layout(dp=4, ep=3), 4, 12, 16, "ep (3) must divide dp"),
        (Layout(dp=4, ep=4), 4, 6, 16, "moe.n_routed_experts"),
        (Layout(dp=1, etp=2), 2, 8, 15, "moe.expert_ffn_dim"),
        (Layout(dp=2, ep=2), 2, None, None, "moe is null"),
        (Layout(dp=0), 0, 8, 16, "dp must be a positive integer"),
    ],
)
def test_bad_layouts_name_the_field(layout, world, experts, ffn, field):
    with pytest.raises(ConfigError, match=field.replace("(", r"\(").replace(")", r"\)")):
        layout.validate(world, experts, ffn)


def test_for_world_needs_etp_dividing_the_world():
    with pytest.raises(ConfigError, match="etp"):
        Layout.for_world(3, etp=2)


def test_serialisable_round_trip():
    lay = Layout(dp=4, ep=2, etp=2)
    assert Layout.from_dict(lay.to_dict()) == lay
    with pytest.raises(ConfigError, match="unknown layout field"):
        Layout.from_dict({"dp": 2, "tp": 2})


def test_coordinates_cover_every_shard_equally():
    """dp 4 x etp 2 with ep 2: each (expert block, width slice) is held by dp/ep = 2 ranks, and
    the etp ranks of one data rank share its micro-batch."""
    lay = Layout(dp=4, ep=2, etp=2)
    held: dict[tuple, list[int]] = {}
    for r in range(lay.world_size):
        c = lay.coords(r)
        es, fs = expert_slice(lay, c, 8, 16)
        held.setdefault((es.start, fs.start), []).append(c.dp_index)
    assert sorted(held) == [(0, 0), (0, 8), (4, 0), (4, 8)]
    assert all(len(v) == 2 for v in held.values())
    assert [lay.coords(r).dp_index for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
