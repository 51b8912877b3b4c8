"""Learning benchmark: policyloop's online learner side by side with Vowpal Wabbit, one stream.

Both learn online on the same simulated recommendation stream (64 features: 32 user, 32 item;
20 candidates per event): each event, the learner picks one candidate with epsilon-greedy
exploration (epsilon 0.1 for both), the simulator draws the click, the learner updates.

- policyloop: the neural-linear head (Bayesian linear regression, ``online/linear.py``) on the
  embeddings of a body trained offline on logged data (``models/training.py``), computed with
  onnxruntime exactly as the learner does; the head starts from the offline one.
- Vowpal Wabbit: ``--cb_explore_adf --epsilon 0.1 -q UA`` from scratch, fed the raw features.

So the comparison is the platform's pipeline as deployed (offline start + online head) against
VW's online learning from nothing; reported are update throughput (events/s, embedding +
decision + update, single process) and cumulative reward (expected clicks from the simulator,
which has less noise than the drawn clicks), plus the oracle's.

Also measured: the whole ``policyloop learn`` loop (bus read, join, embed, update, publish with
the OPE gate) over the embedded bus, in records/s and examples/s for one process.

Usage: python bench/learning_bench.py [--events 5000] [--out bench/results/learning.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EPSILON = 0.1
ENV = {"context_dim": 32, "item_dim": 32, "n_candidates": 20, "n_items": 500}


def _eps_greedy(scores: np.ndarray, rng: np.random.Generator) -> int:
    if rng.random() < EPSILON:
        return int(rng.integers(len(scores)))
    return int(np.argmax(scores))


def run_policyloop(stream: list, seed: int) -> dict:
    import torch

    from models.export import export_and_register
    from models.training import TrainConfig, train_offline
    from online.linear import LinearHeads
    from policyloop.registry.local import LocalRegistry
    from policyloop.registry.onnx_head import read_head
    from policyloop.registry.onnx_model import choose_providers, load_model

    torch.manual_seed(seed)
    result = train_offline(TrainConfig(scenario="recsys", env=ENV, seed=seed))
    registry = LocalRegistry(Path(tempfile.mkdtemp()) / "registry")
    version = export_and_register(result.model, result.env, registry, policy="recsys",
                                  training=result.summary)
    model = load_model(version, expected=None, providers=choose_providers(False))
    heads = LinearHeads.from_head(*read_head(version.read_model(), version.manifest.head))
    rng = np.random.default_rng(seed)
    total = 0.0
    start = time.perf_counter()
    for ctx, items, expected, draws in stream:
        _, emb = model.run(ctx[None], items[None])
        weight, bias = heads.head()
        action = _eps_greedy(emb[0] @ weight[0] + bias[0], rng)
        reward = float(draws[action] < expected[action])
        heads.update(emb[0, action], reward)
        total += expected[action]
    seconds = time.perf_counter() - start
    return {"events_per_s": len(stream) / seconds, "cumulative_expected_reward": total,
            "offline_start_value": result.summary["value_trained"]}


def run_vw(stream: list, seed: int) -> dict:
    import vowpalwabbit

    vw = vowpalwabbit.Workspace(f"--cb_explore_adf --epsilon {EPSILON} -q UA --quiet "
                                f"--random_seed {seed}")
    rng = np.random.default_rng(seed)
    total = 0.0

    def lines(ctx: np.ndarray, items: np.ndarray) -> list[str]:
        shared = "shared |U " + " ".join(f"u{j}:{v:.5f}" for j, v in enumerate(ctx))
        return [shared] + ["|A " + " ".join(f"a{j}:{v:.5f}" for j, v in enumerate(item))
                           for item in items]

    start = time.perf_counter()
    for ctx, items, expected, draws in stream:
        example = lines(ctx, items)
        pmf = np.asarray(vw.predict(example), dtype=np.float64)
        pmf /= pmf.sum()
        action = int(np.searchsorted(np.cumsum(pmf), rng.random() * 0.999999))
        reward = float(draws[action] < expected[action])
        example[action + 1] = f"0:{-reward}:{pmf[action]} " + example[action + 1]
        vw.learn(example)
        total += expected[action]
    seconds = time.perf_counter() - start
    vw.finish()
    return {"events_per_s": len(stream) / seconds, "cumulative_expected_reward": total}


def run_join_and_learn(n: int, seed: int, kafka: str = "") -> dict:
    """The whole ``policyloop learn`` loop over the embedded bus (or Kafka at ``kafka``): read,
    join, embed, update, publish every 1,000 examples. Routing, events written beforehand."""
    import torch

    from models.export import export_and_register
    from models.policies import QNetwork
    from online.config import LearnConfig
    from online.learner import Learner
    from policyloop.bus.interface import Producer
    from policyloop.bus.local_log import LocalLog
    from policyloop.registry.local import LocalRegistry
    from policyloop.simulators.routing import RoutingEnv
    from tests.bandit_stream import routing_events, write

    root = Path(tempfile.mkdtemp())
    torch.manual_seed(seed)
    env = RoutingEnv()
    export_and_register(QNetwork(len(env.feature_schema.context), 8), env,
                        LocalRegistry(root / "registry"), policy="routing", training={})
    policy = "routing"
    if kafka:
        import uuid

        from policyloop.bus.kafka import KafkaProducerAdapter
        from policyloop.bus.topics import DEFAULT_TOPICS, create_topics

        create_topics(kafka, DEFAULT_TOPICS)
        policy = f"routing-{uuid.uuid4().hex[:8]}"  # keeps earlier runs' events apart
        first = LocalRegistry(root / "registry").current("routing")
        LocalRegistry(root / "registry").publish(
            policy, first.read_model(), dataclasses.replace(first.manifest, policy=policy))
        producer: Producer = KafkaProducerAdapter(kafka)
    else:
        producer = LocalLog(root / "bus", partitions=4).producer()
    records = routing_events(n, seed=seed, policy=policy)
    write(producer, records)
    producer.close()
    learner = Learner(LearnConfig(registry=root / "registry", policy=policy,
                                  bus="kafka" if kafka else "local", kafka_bootstrap=kafka,
                                  group=f"bench-{policy}", bus_path=root / "bus", partitions=4,
                                  checkpoint=root / "ckpt.json", window_ms=1000,
                                  publish_every=1000, idle_exit_s=0.5, gate=True))
    start = time.perf_counter()
    learner.run()
    seconds = time.perf_counter() - start - 0.5  # minus the idle wait that ends the run
    return {"bus": "kafka" if kafka else "local", "records": len(records),
            "examples": learner.examples,
            "records_per_s": len(records) / seconds,
            "examples_per_s": learner.examples / seconds,
            "versions_published": len(learner.published)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kafka", default="", help="also run the learn loop on this Kafka "
                        "(bootstrap HOST:PORT, e.g. from scripts/kafka.sh start)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "learning.json")
    args = parser.parse_args()
    from policyloop.simulators.recsys import RecsysEnv

    env = RecsysEnv(**ENV, seed=args.seed)
    rng = np.random.default_rng(args.seed + 1)
    ctx, items, expected = env.sample_contexts(args.events, rng)
    draws = rng.random(expected.shape)  # the same click draws for both learners
    stream = list(zip(ctx, items, expected, draws, strict=True))
    results = {
        "events": args.events,
        "oracle_cumulative_expected_reward": float(expected.max(axis=1).sum()),
        "uniform_cumulative_expected_reward": float(expected.mean(axis=1).sum()),
        "policyloop": run_policyloop(stream, args.seed),
        "vowpalwabbit": run_vw(stream, args.seed),
        "join_and_learn": run_join_and_learn(args.events * 4, args.seed),
    }
    if args.kafka:
        results["join_and_learn_kafka"] = run_join_and_learn(args.events * 4, args.seed,
                                                             args.kafka)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
