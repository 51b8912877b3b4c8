"""What a simulator hands the traffic driver: requests an app would send, and the truth only a
simulator knows."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Arrivals(NamedTuple):
    """n simulated requests, what an app would send plus the truth only a simulator knows:
    context float32[n, Dc], action_features float32[n, K, Da] (None for a fixed action set),
    expected float64[n, K] (true expected reward of each candidate), action_ids n lists of K."""

    context: np.ndarray
    action_features: np.ndarray | None
    expected: np.ndarray
    action_ids: list[list[str]]
