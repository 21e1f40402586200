"""runtime/base.py: infer() checks the feeds once, activates, times infer_impl; runners implement only *_impl."""
from __future__ import annotations

import numpy as np
import pytest

from tokensieve.errors import ConfigError
from tokensieve.runtime.base import BaseRunner


class Doubler(BaseRunner):
    """A runner that implements only the *_impl parts: y = 2 x for x [batch, 3] float32."""

    name = "doubler"

    def __init__(self):
        self.calls: list[str] = []
        self._active = False

    @property
    def is_active(self) -> bool:
        return self._active

    def activate_impl(self):
        self.calls.append("activate")
        self._active = True

    def deactivate_impl(self):
        self.calls.append("deactivate")
        self._active = False

    @property
    def input_specs(self):
        return [("x", ("batch", 3), np.dtype(np.float32))]

    def check_feeds_impl(self, feeds):
        self.calls.append("check")
        if feeds["x"].shape[0] > 4:
            raise ConfigError("batch > 4")

    def infer_impl(self, feeds):
        self.calls.append("infer")
        return {"y": feeds["x"] * 2}


def test_infer_is_check_activate_time_impl():
    r = Doubler()
    out = r.infer({"x": np.ones((2, 3), np.float32)})
    assert np.array_equal(out["y"], np.full((2, 3), 2, np.float32))
    assert r.calls == ["check", "activate", "infer"] and r.inference_time is not None and r.inference_time >= 0
    with r:  # already active: no second activate_impl; deactivated on exit
        r.infer({"x": np.ones((1, 3), np.float32)})
    assert r.calls == ["check", "activate", "infer", "check", "infer", "deactivate"] and not r.is_active
    r.deactivate()  # inactive: a no-op
    assert r.calls[-1] == "deactivate" and r.calls.count("deactivate") == 1


@pytest.mark.parametrize("feeds, match", [
    ({"x": np.ones((1, 3), np.float64)}, "has dtype float64 but the model expects float32"),
    ({"x": np.ones((1, 4), np.float32)}, r"has shape \(1, 4\) but the model expects \(batch, 3\)"),
    ({"x": np.ones((1, 3), np.float32), "z": np.ones(1)}, r"unknown input\(s\) \['z'\]"),
    ({}, r"missing input\(s\) \['x'\]"),
    ({"x": np.ones((5, 3), np.float32)}, "batch > 4"),
])
def test_bad_feed_fails_before_the_backend(feeds, match):
    r = Doubler()
    with pytest.raises(ConfigError, match=match):
        r.infer(feeds)
    assert "activate" not in r.calls and "infer" not in r.calls and r.inference_time is None
