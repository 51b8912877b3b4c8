"""Freshness: how long from a reward being produced to a model that learned from it answering
``Decide``.

Three processes on this machine, as deployed: ``policyloop serve`` (registry watch every
0.2 s), ``policyloop learn`` (reward window 0.5 s, a version every 100 examples, gate off) and
this script as the app: it sends routing decisions at a steady rate, each rewarded 20 ms later
through the server, and notes which version answers each decision. The learner records, for
every version it publishes, the event time of the newest reward it learned from
(``latest_reward_ms``, stamped by the server when the reward arrived); the version's freshness
is the moment the server first answers with it minus that time. The reward window is part of
it by design: an event is learned from only after its window closes.

With ``--kafka HOST:PORT`` the same three processes run as deployed without a shared volume:
decisions and rewards on Kafka, the registry on the compacted ``models`` topic (server and
learner each with their own cache), the learner in its own consumer group.

Usage: python bench/freshness_bench.py [--seconds 30] [--kafka HOST:PORT]
       [--out bench/results/freshness.json]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=200.0, help="decisions per second")
    parser.add_argument("--kafka", metavar="HOST:PORT",
                        help="run on this Kafka (topics from `policyloop topics`)")
    parser.add_argument("--out", type=Path, help="default bench/results/freshness.json "
                        "(freshness-kafka.json with --kafka)")
    args = parser.parse_args()
    out = args.out or ROOT / "bench" / "results" / (
        "freshness-kafka.json" if args.kafka else "freshness.json")

    import torch

    from bench.serving_bench import start
    from models.export import export_and_register
    from models.policies import QNetwork
    from policyloop.registry.interface import open_registry
    from policyloop.registry.local import LocalRegistry
    from policyloop.simulators.routing import RoutingEnv
    from protos import decision_pb2 as pb
    from protos import decision_pb2_grpc as pb_grpc

    work = Path(tempfile.mkdtemp(prefix="policyloop-fresh-"))
    torch.manual_seed(0)
    env = RoutingEnv()
    policy = f"routing-{uuid.uuid4().hex[:8]}" if args.kafka else "routing"
    if args.kafka:
        from policyloop.bus.topics import DEFAULT_TOPICS, create_topics

        create_topics(args.kafka, DEFAULT_TOPICS)
        where = ["--bus", "kafka", "--kafka", args.kafka, "--registry-kafka", args.kafka]
        learn_from = ["--from-latest"]  # the topics' history belongs to other runs
    else:
        where = ["--bus-path", str(work / "bus")]
        learn_from = []
    registry = open_registry(work / "seed", kafka=args.kafka or "") if args.kafka else \
        LocalRegistry(work / "registry")
    export_and_register(QNetwork(len(env.feature_schema.context), 8), env, registry,
                        policy=policy, training={})
    registry.close()
    server, line = start([sys.executable, "-m", "policyloop.cli", "--log-level", "WARNING",
                          "serve", "--registry", str(work / "registry"), "--port", "0",
                          "--metrics-port", "0", *where,
                          "--spool-dir", str(work / "spool"), "--watch-interval", "0.2",
                          "--policy", f"{policy}=epsilon_greedy:0.1"], "policyloop serve:")
    target = line.split("grpc=")[1].split()[0]
    learner, _ = start(
        [sys.executable, "-m", "policyloop.cli", "--log-level", "WARNING", "learn",
         "--registry", str(work / "learner-registry" if args.kafka else work / "registry"),
         "--policy", policy, *where, "--group", f"fresh-{policy}",
         "--checkpoint", str(work / "ckpt.json"), "--window-ms", "500",
         "--publish-every", "100", "--publish-interval", "1", "--no-gate", *learn_from],
        "policyloop learn: consuming")
    first_served: dict[int, float] = {}
    rng = np.random.default_rng(0)
    contexts, _, expected = env.sample_contexts(int(args.seconds * args.rate) + 1, rng)
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.DecisionServiceStub(channel)
            pending: list[tuple[float, str, float]] = []
            end = time.time() + args.seconds
            i = 0
            while time.time() < end:
                now = time.time()
                response = stub.Decide(pb.DecideRequest(
                    policy=policy, context=pb.Features(dense=contexts[i])), timeout=5)
                first_served.setdefault(response.model_version, now)
                action = list(env.action_names).index(response.chosen[0].action_id)
                pending.append((now + 0.02, response.event_id,
                                float(rng.random() < expected[i, action])))
                while pending and pending[0][0] <= time.time():
                    _, event_id, value = pending.pop(0)
                    stub.Reward(pb.RewardRequest(event_id=event_id, value=value), timeout=5)
                i += 1
                time.sleep(max(0.0, 1 / args.rate - (time.time() - now)))
    finally:
        learner.send_signal(signal.SIGTERM)
        learner.wait(timeout=30)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    published = json.loads((work / "ckpt.json").read_text())["published"]
    samples = [first_served[p["version"]] - p["latest_reward_ms"] / 1000
               for p in published if p["latest_reward_ms"] and p["version"] in first_served]
    freshness = np.array(samples)
    result = {"bus": "kafka" if args.kafka else "local", "decisions": i,
              "versions_measured": len(samples),
              "p50_s": float(np.percentile(freshness, 50)) if samples else None,
              "p95_s": float(np.percentile(freshness, 95)) if samples else None,
              "settings": {"reward_window_ms": 500, "publish_every": 100,
                           "watch_interval_s": 0.2, "reward_delay_ms": 20,
                           "rate_per_s": args.rate}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
