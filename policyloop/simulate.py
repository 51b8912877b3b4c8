"""``policyloop simulate``: an app's traffic against any running server, from a simulator.

It behaves like a client, through the client library apps use (``policyloop_client``'s
``AsyncClient``): for each simulated arrival (a user with candidate items, or a ticket) it
calls ``Decide``, then reports the outcome with ``Reward`` after a random delay
(exponential, mean ``reward_delay_ms``), the way clicks and resolutions arrive later than the
decision. Some outcomes are never reported: in recsys only clicks are sent (a shown item
without a click has no event, the learner's default reward covers it) and in both scenarios a
fraction ``reward_loss`` of reports is lost. The simulator also knows what no client knows, the
true expected reward of every candidate, so each decision is scored exactly: that is what the
demo's learning curve and the end-to-end tests measure, not the noisy observed clicks.

Arrivals are drawn independently (``sample_arrivals``), so several requests can be in flight at
once; ``drift_at`` switches the simulator's preferences after that many decisions.

With ``log_to`` it needs no server: it writes ``events`` decisions of a logging policy (the
heuristic an app might run, or uniform) with their propensities and rewards to a file, and the
scenario's policy spec beside it, the inputs of ``policyloop train --spec --data``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from policyloop_client import AsyncClient, PolicyloopClientError, Retry

from policyloop.contract.errors import InvalidArgument
from policyloop.contract.settings import setting
from policyloop.simulators.arrivals import Arrivals
from policyloop.simulators.logged import LOGGING_POLICIES
from policyloop.simulators.recsys import RecsysEnv
from policyloop.simulators.routing import RoutingEnv

_CHUNK = 1024


@dataclass(frozen=True)
class TrafficConfig:
    target: str = setting("", "HOST:PORT of a policyloop server (required unless --log-to)",
                          metavar="HOST:PORT")
    scenario: str = setting("recsys", "simulator", choices=("recsys", "routing"))
    policy: str = setting("", "the served policy's name; empty: the scenario")
    events: int = setting(10_000, "decisions to make")
    rate: float = setting(0.0, "decisions per second; 0: as fast as the server answers")
    concurrency: int = setting(8, "requests in flight")
    reward_delay_ms: float = setting(200.0, "mean delay before an outcome is reported "
                                     "(exponential)")
    reward_loss: float = setting(0.05, "fraction of outcome reports never sent")
    drift_at: int | None = setting(None, "switch the simulator's preferences after this many "
                                   "decisions")
    seed: int = setting(0, "seed of the users or tickets, delays and losses")
    world_seed: int = setting(0, "the simulator's world; must match the one the policy was "
                              "trained on")
    timeout_s: float = setting(5.0, "per-call deadline, seconds", flag="--timeout")
    token: str = setting("", "bearer token with the decide and reward scopes, for a server "
                         "with tokens on")
    log_to: str = setting("", "no server: write EVENTS logged decisions to this file (.csv, "
                          ".jsonl or .parquet) and the scenario's spec beside it "
                          "(FILE.spec.toml), for `train --spec --data`", metavar="FILE")
    logging_policy: str = setting("heuristic", "with --log-to: the policy that logs "
                                  "(policyloop/simulators/logged.py)",
                                  choices=LOGGING_POLICIES)

    def __post_init__(self) -> None:
        if self.scenario not in ("recsys", "routing"):
            raise InvalidArgument(f"scenario must be recsys or routing, got {self.scenario!r}")
        if not self.target and not self.log_to:
            raise InvalidArgument("target: HOST:PORT of a server is required (or --log-to "
                                  "FILE to write logs offline)")
        if self.logging_policy not in LOGGING_POLICIES:
            raise InvalidArgument(f"logging_policy must be one of {LOGGING_POLICIES}, got "
                                  f"{self.logging_policy!r}")
        if self.events < 1:
            raise InvalidArgument(f"events must be >= 1, got {self.events}")
        if self.concurrency < 1:
            raise InvalidArgument(f"concurrency must be >= 1, got {self.concurrency}")
        if self.rate < 0:
            raise InvalidArgument(f"rate must be >= 0, got {self.rate}")
        if not 0 <= self.reward_loss <= 1:
            raise InvalidArgument(f"reward_loss must be in [0, 1], got {self.reward_loss}")
        if self.reward_delay_ms < 0:
            raise InvalidArgument(f"reward_delay_ms must be >= 0, got {self.reward_delay_ms}")

    @property
    def policy_name(self) -> str:
        return self.policy or self.scenario


@dataclass
class Traffic:
    """What was sent and how good each decision truly was; arrays grow with ``decisions``."""

    decisions: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # gRPC status name -> count
    rewards_sent: int = 0
    reward_value_sum: float = 0.0
    expected: list[float] = field(default_factory=list)  # true E[reward] of the chosen action
    optimal: list[float] = field(default_factory=list)  # best candidate's E[reward]
    uniform: list[float] = field(default_factory=list)  # mean over candidates
    versions: list[int] = field(default_factory=list)  # model version that answered
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    def moving_average(self, window: int = 500) -> float:
        tail = self.expected[-window:]
        return float(np.mean(tail)) if tail else float("nan")

    def rate(self) -> float:
        end = self.finished if self.finished is not None else time.monotonic()
        return self.decisions / max(end - self.started, 1e-9)

    def summary(self) -> dict[str, Any]:
        expected = np.array(self.expected)
        return {
            "decisions": self.decisions, "errors": dict(self.errors),
            "rewards_sent": self.rewards_sent, "decisions_per_s": round(self.rate(), 1),
            "mean_expected_reward": float(expected.mean()) if len(expected) else None,
            "mean_optimal_reward": float(np.mean(self.optimal)) if self.optimal else None,
            "mean_uniform_reward": float(np.mean(self.uniform)) if self.uniform else None,
            "regret_per_decision": (float(np.mean(self.optimal) - expected.mean())
                                    if len(expected) else None),
            "versions_seen": sorted(set(self.versions)),
            # the learning curve: mean expected and optimal reward of each fifth of decisions
            "expected_by_fifth": [float(part.mean()) for part in np.array_split(expected, 5)
                                  if len(part)],
            "optimal_by_fifth": [float(part.mean())
                                 for part in np.array_split(np.array(self.optimal), 5)
                                 if len(part)],
        }


def make_simulator(scenario: str, world_seed: int = 0) -> RecsysEnv | RoutingEnv:
    return RecsysEnv(seed=world_seed) if scenario == "recsys" else RoutingEnv(seed=world_seed)


class _Arrivals:
    """Arrivals drawn a chunk at a time; a drift discards what was drawn before it."""

    def __init__(self, env: RecsysEnv | RoutingEnv, rng: np.random.Generator) -> None:
        self.env, self.rng = env, rng
        self.start, self.chunk = 0, env.sample_arrivals(_CHUNK, rng)

    def redraw(self, start: int) -> None:
        self.start, self.chunk = start, self.env.sample_arrivals(_CHUNK, self.rng)

    def get(self, i: int) -> tuple[Arrivals, int]:
        if i - self.start >= _CHUNK:
            self.redraw(i)
        return self.chunk, i - self.start


def candidates_of(arrivals: Arrivals, j: int) -> list[tuple[str, list[float]]] | None:
    """Request ``j``'s candidates as the client library takes them (None: a fixed action
    set, where the server decides among all of the policy's actions)."""
    if arrivals.action_features is None:
        return None
    return [(action_id, features.tolist()) for action_id, features
            in zip(arrivals.action_ids[j], arrivals.action_features[j], strict=True)]


async def run_traffic(config: TrafficConfig, *, env: RecsysEnv | RoutingEnv | None = None,
                      traffic: Traffic | None = None,
                      on_drift: Callable[[int], None] | None = None) -> Traffic:
    """Send ``config.events`` decisions and their delayed rewards; returns what happened.

    ``traffic`` may be passed in so a caller (the demo's live display) can watch it fill.
    Every reward task is awaited before returning, so the server has every report.
    """
    env = env or make_simulator(config.scenario, config.world_seed)
    traffic = traffic or Traffic()
    rng = np.random.default_rng(config.seed)
    arrivals = _Arrivals(env, np.random.default_rng(config.seed + 1))
    send_zeros = config.scenario != "recsys"
    policy = config.policy_name
    next_index = 0
    reward_tasks: set[asyncio.Task[None]] = set()
    start = time.monotonic()

    async def report(client: AsyncClient, delay: float, event_id: str, value: float) -> None:
        await asyncio.sleep(delay)
        try:
            await client.reward(event_id, value, policy=policy)
            traffic.rewards_sent += 1
            traffic.reward_value_sum += value
        except PolicyloopClientError as exc:
            name = f"Reward:{exc.code.name}"
            traffic.errors[name] = traffic.errors.get(name, 0) + 1

    async def worker(client: AsyncClient) -> None:
        nonlocal next_index
        while next_index < config.events:
            i = next_index
            next_index += 1
            if config.drift_at is not None and i == config.drift_at:
                env.drift()
                arrivals.redraw(i)
                if on_drift is not None:
                    on_drift(i)
            if config.rate > 0:
                await asyncio.sleep(max(0.0, start + i / config.rate - time.monotonic()))
            chunk, j = arrivals.get(i)
            try:
                decision = await client.decide(policy, chunk.context[j].tolist(),
                                               candidates_of(chunk, j))
            except PolicyloopClientError as exc:
                name = f"Decide:{exc.code.name}"
                traffic.errors[name] = traffic.errors.get(name, 0) + 1
                continue
            action = decision.chosen[0].index
            expected = chunk.expected[j]
            traffic.decisions += 1
            traffic.expected.append(float(expected[action]))
            traffic.optimal.append(float(expected.max()))
            traffic.uniform.append(float(expected.mean()))
            traffic.versions.append(decision.model_version)
            outcome = float(rng.random() < expected[action])
            lost = rng.random() < config.reward_loss
            delay = rng.exponential(config.reward_delay_ms / 1000.0)
            if not lost and (outcome > 0 or send_zeros):
                task = asyncio.create_task(report(client, delay, decision.event_id, outcome))
                reward_tasks.add(task)
                task.add_done_callback(reward_tasks.discard)

    # The app's own client library, as an app would use it; no retries, so every failed call
    # is counted as the server answered it.
    async with AsyncClient(config.target, token=config.token or None,
                           timeout=config.timeout_s, retry=Retry(attempts=1)) as client:
        await client.wait_ready(max(config.timeout_s, 30.0))
        await asyncio.gather(*(worker(client) for _ in range(config.concurrency)))
        if reward_tasks:
            await asyncio.gather(*reward_tasks)
    traffic.finished = time.monotonic()
    return traffic


def simulate_command(config: TrafficConfig, *, as_json: bool) -> int:
    """``policyloop simulate``: run the traffic, print what was sent and how good it was;
    with ``log_to``, write logs offline instead."""
    import json

    if config.log_to:
        from pathlib import Path

        from policyloop.simulators.logfile import simulate_logs

        rows, spec_path = simulate_logs(make_simulator(config.scenario, config.world_seed),
                                        Path(config.log_to), config.events, seed=config.seed,
                                        logging_policy=config.logging_policy)
        print(json.dumps({"file": config.log_to, "rows": rows, "spec": str(spec_path),
                          "logging_policy": config.logging_policy}))
        return 0
    traffic = asyncio.run(run_traffic(config))
    summary = traffic.summary()
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            print(f"{key:>22}: {value}")
    return 0 if not traffic.errors else 1
