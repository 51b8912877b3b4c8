"""Off-policy estimators: hand-computed values, soundness with tiny propensities, and
unbiasedness against the simulator's true value."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from online import ope
from policyloop.contract.errors import InvalidArgument
from policyloop.simulators.logged import collect_logs, true_policy_value
from policyloop.simulators.routing import RoutingEnv

ROOT = Path(__file__).resolve().parents[1]
R = np.array([1.0, 0.0, 1.0, 0.5])
P = np.array([0.5, 0.25, 0.1, 1.0])
PI = np.array([1.0, 0.5, 0.0, 0.5])  # weights 2, 2, 0, 0.5


def test_hand_computed_values() -> None:
    assert ope.ips(R, P, PI).value == pytest.approx((2 * 1 + 0 + 0 + 0.5 * 0.5) / 4)
    assert ope.snips(R, P, PI).value == pytest.approx(2.25 / 4.5)
    q = np.array([0.5, 0.5, 0.5, 0.5])
    expected = np.mean(0.5 + np.array([2, 2, 0, 0.5]) * (R - 0.5))
    assert ope.dr(R, P, PI, q, q).value == pytest.approx(expected)
    clipped = ope.ips(R, P, PI, clip=1.0)
    assert clipped.clipped == 2 and clipped.value == pytest.approx((1 + 0 + 0 + 0.25) / 4)
    e = ope.ips(R, P, PI)
    assert e.max_weight == 2.0
    assert e.effective_sample_size == pytest.approx(4.5 ** 2 / (4 + 4 + 0.25))
    assert e.ci_low < e.value < e.ci_high


def test_tiny_propensities_stay_finite_and_clipping_is_reported() -> None:
    rng = np.random.default_rng(0)
    n = 1000
    p = np.full(n, 0.5)
    p[:5] = 1e-5
    pi = np.full(n, 0.5)
    r = rng.random(n)
    raw = ope.ips(r, p, pi)
    assert np.isfinite([raw.value, raw.ci_low, raw.ci_high]).all()
    assert raw.max_weight == pytest.approx(5e4)
    assert raw.effective_sample_size < 10  # the tiny propensities dominate, and it says so
    clipped = ope.snips(r, p, pi, clip=100.0)
    assert clipped.clipped == 5 and 0 <= clipped.value <= 1


@pytest.mark.parametrize("p, pi, message", [
    (np.array([0.0, 0.5, 0.5, 0.5]), PI, "propensity must be in"),
    (P, np.array([1.5, 0, 0, 0]), "target probability must be in"),
    (np.array([np.nan, 0.5, 0.5, 0.5]), PI, "NaN"),
])
def test_bad_inputs_are_refused(p, pi, message) -> None:
    with pytest.raises(InvalidArgument, match=message):
        ope.ips(R, p, pi)


def _target(expected: np.ndarray) -> np.ndarray:
    """A target policy different from the logging one: 80% on the truly best queue."""
    probs = np.full(expected.shape, 0.2 / (expected.shape[1] - 1))
    probs[np.arange(len(expected)), expected.argmax(axis=1)] = 0.8
    return probs


def test_estimators_are_unbiased_for_the_simulators_true_value() -> None:
    env = RoutingEnv()
    estimates: dict[str, list[ope.Estimate]] = {"ips": [], "snips": [], "dr": []}
    truths = []
    for seed in range(20):
        data = collect_logs(env, 3000, seed=seed)
        probs = _target(data.expected_rewards)
        truths.append(true_policy_value(probs, data.expected_rewards))
        pi = probs[np.arange(len(data)), data.action]
        base = ope.ridge_baseline(data.context, data.reward)
        results = [ope.ips(data.reward, data.propensity, pi),
                   ope.snips(data.reward, data.propensity, pi),
                   ope.dr(data.reward, data.propensity, pi, base, base)]
        for e in results:
            estimates[e.estimator].append(e)
    truth = float(np.mean(truths))
    for name, runs in estimates.items():
        values = np.array([e.value for e in runs])
        # the average over 20 independent logs is within 3 standard errors of the truth
        assert abs(values.mean() - truth) < 3 * values.std(ddof=1) / np.sqrt(len(values)) + 0.005
        covered = np.mean([e.ci_low <= t <= e.ci_high for e, t in zip(runs, truths,
                                                                         strict=True)])
        assert covered >= 0.8, f"{name}: 95% intervals covered the truth only {covered:.0%}"


def test_evaluate_command_reads_a_csv_and_prints_json(tmp_path: Path) -> None:
    env = RoutingEnv()
    data = collect_logs(env, 2000, seed=3)
    probs = _target(data.expected_rewards)
    pi = probs[np.arange(len(data)), data.action]
    path = tmp_path / "log.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        d = data.context.shape[1]
        writer.writerow(["action", "reward", "propensity", "target_p",
                         *(f"x{i}" for i in range(d))])
        for i in range(len(data)):
            writer.writerow([data.action[i], data.reward[i], repr(float(data.propensity[i])),
                             repr(float(pi[i])), *data.context[i].tolist()])
    out = subprocess.run([sys.executable, "-m", "policyloop.cli", "evaluate", str(path),
                          "--target-column", "target_p", "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report = {e["estimator"]: e for e in json.loads(out.stdout)}
    assert report["ips"]["value"] == pytest.approx(
        ope.ips(data.reward, data.propensity, pi).value, rel=1e-9)
    assert set(report) == {"ips", "snips", "dr"}
    table = subprocess.run([sys.executable, "-m", "policyloop.cli", "evaluate", str(path),
                            "--target-column", "target_p", "--clip", "5"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert "snips" in table.stdout and "clipped" in table.stdout


def test_evaluate_a_registered_model_as_the_target(tmp_path: Path) -> None:
    from policyloop.evaluate import read_events, target_from_model
    from policyloop.registry.local import LocalRegistry
    from tests.onnx_models import qnet_model

    registry = LocalRegistry(tmp_path / "registry")
    registry.publish("routing", *qnet_model())
    rng = np.random.default_rng(0)
    rows = [{"action": f"queue-{rng.integers(3)}", "reward": float(rng.random() < 0.5),
             "propensity": 1 / 3, "context": rng.standard_normal(5).round(3).tolist()}
            for _ in range(50)]
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    events = read_events(path)
    greedy = target_from_model(events, tmp_path / "registry", "routing", None, "greedy")
    soft = target_from_model(events, tmp_path / "registry", "routing", None, "softmax:1.0")
    assert set(np.unique(greedy)) <= {0.0, 1.0} and 0 < greedy.sum() < 50
    assert ((soft > 0) & (soft < 1)).all()
    out = subprocess.run([sys.executable, "-m", "policyloop.cli", "evaluate", str(path),
                          "--registry", str(tmp_path / "registry"), "--policy", "routing",
                          "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    ips_value = json.loads(out.stdout)[0]["value"]
    assert ips_value == pytest.approx(
        ope.ips(events.reward, events.propensity, greedy).value)
