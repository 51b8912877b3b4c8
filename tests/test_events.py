"""Decision, reward and activation records: exact round trips, and refusal of what cannot be
joined."""

from __future__ import annotations

import numpy as np
import pytest

from policyloop.contract.errors import InvalidArgument
from policyloop.contract.events import ActivationEvent, DecisionEvent, RewardEvent


def _decision(**changes: object) -> DecisionEvent:
    rng = np.random.default_rng(0)
    fields: dict = dict(
        event_id="e-1", policy="p", model_version=3, timestamp_ms=1_700_000_000_123,
        context=rng.standard_normal(16).astype(np.float32),
        action_ids=["a", "b", "c"],
        action_features=rng.standard_normal((3, 4)).astype(np.float32),
        chosen=[2, 0], propensities=[0.5, 0.25],
        probabilities=np.array([[0.25, 0.25, 0.5], [0.25, 0.5, 0.25]]), strategy="softmax",
        active=False, baseline_action=None, policy_action="c")
    fields.update(changes)
    return DecisionEvent(**fields)


def test_events_round_trip_float32_values_bit_for_bit() -> None:
    event = _decision()
    decoded = DecisionEvent.from_bytes(event.to_bytes())
    assert decoded == event
    original = np.asarray(event.context, dtype=np.float32)
    assert np.array_equal(np.asarray(decoded.context, dtype=np.float32).view(np.uint32),
                          original.view(np.uint32))
    reward = RewardEvent(event_id="e-1", policy="", value=1.0, slot_rewards=[1.0, 0.0],
                         timestamp_ms=5)
    activation = ActivationEvent(event_id="e-1", policy="p", timestamp_ms=6)
    assert RewardEvent.from_bytes(reward.to_bytes()) == reward
    assert ActivationEvent.from_bytes(activation.to_bytes()) == activation
    assert event.key == reward.key == activation.key == b"e-1"
    assert b" " not in reward.to_bytes()  # compact


def test_decoding_accepts_integral_floats_and_ignores_new_fields() -> None:
    data = b'{"event_id":"e","policy":"p","value":1,"slot_rewards":[0,1],"timestamp_ms":2,' \
           b'"added_later":true}'
    event = RewardEvent.from_bytes(data)
    assert event.value == 1.0 and isinstance(event.value, float)
    assert event.slot_rewards == [0.0, 1.0]


@pytest.mark.parametrize("data, match", [
    (b"\xff\xfe", "UTF-8 JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"event_id":"e","policy":"p","value":"1","slot_rewards":[],"timestamp_ms":2}',
     "'value' must be float"),
    (b'{"event_id":"e","policy":"p","value":NaN,"slot_rewards":[],"timestamp_ms":2}',
     "UTF-8 JSON"),
    (b'{"event_id":"e","policy":"p","value":1.0,"slot_rewards":[]}', "'timestamp_ms' is missing"),
    (b'{"event_id":"e","policy":"p","value":1.0,"slot_rewards":[true],"timestamp_ms":2}',
     "'slot_rewards'"),
])
def test_malformed_reward_bytes_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        RewardEvent.from_bytes(data)


@pytest.mark.parametrize("changes, match", [
    ({"chosen": [3, 0]}, "chosen index 3"),
    ({"propensities": [0.5]}, "1 propensities for 2"),
    ({"action_features": np.ones((1, 4), np.float32)}, "action_features"),
])
def test_decisions_that_cannot_be_joined_are_refused(changes: dict, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        DecisionEvent.from_bytes(_decision(**changes).to_bytes())


def test_nan_is_refused_at_encoding() -> None:
    with pytest.raises(InvalidArgument, match="NaN"):
        _decision(context=np.array([np.nan], np.float32)).to_bytes()
