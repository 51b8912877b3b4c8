"""The ``policyloop`` command: one entry point, a subcommand per process or task.

Each subcommand builds its one typed configuration object here, from flags (and, for the
server, a TOML file and ``POLICYLOOP_*`` variables), and hands it to the code that runs it.
Heavy imports (torch, grpc) happen inside the handlers so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from policyloop.contract.errors import PolicyloopError
from policyloop.logs import setup_logging

if TYPE_CHECKING:
    from online.config import LearnConfig
    from online.learner import Learner


def _train(args: argparse.Namespace) -> int:
    from models.training import TrainConfig, train_command

    cfg = TrainConfig(scenario=args.scenario, n_logged=args.n_logged, epochs=args.epochs,
                      objective=args.objective, seed=args.seed)
    return train_command(cfg, registry=None if args.no_export else args.registry,
                         policy=args.policy or args.scenario, checkpoint=args.checkpoint,
                         registry_kafka=args.registry_kafka or "")


def _export(args: argparse.Namespace) -> int:
    from models.export import export_command

    return export_command(args.checkpoint, registry=args.registry,
                          policy=args.policy, out=args.out,
                          registry_kafka=args.registry_kafka or "")


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from serving.config import PolicyConfig, load_serve_config
    from serving.server import serve

    overrides = {
        "registry": args.registry, "registry_kafka": args.registry_kafka,
        "host": args.host, "port": args.port,
        "metrics_port": args.metrics_port, "bus": args.bus, "bus_path": args.bus_path,
        "kafka_bootstrap": args.kafka, "spool_dir": args.spool_dir,
        "default_strategy": args.strategy, "grace_period_s": args.grace,
        "watch_interval_s": args.watch_interval,
        "durable_ack": True if args.durable_ack else None,
        "tls_cert": args.tls_cert, "tls_key": args.tls_key, "tls_client_ca": args.tls_client_ca,
        "tokens_file": args.tokens_file,
        "micro_batch_size": args.micro_batch, "micro_batch_wait_ms": args.micro_batch_wait_ms,
        "log_writer": args.log_writer,
    }
    if args.policy:
        overrides["policies"] = {
            name: PolicyConfig(strategy=spec or (args.strategy or "epsilon_greedy:0.1"),
                               apprentice=name in (args.apprentice or []))
            for name, _, spec in (p.partition("=") for p in args.policy)}
    config = load_serve_config(args.config, overrides)
    return asyncio.run(serve(config))


def _registry(args: argparse.Namespace) -> int:
    from policyloop.registry.local import LocalRegistry

    registry = LocalRegistry(args.registry)
    if args.action == "list":
        rows = []
        for policy in registry.policies():
            try:
                current = registry.current(policy).version
            except PolicyloopError:
                current = None
            rows.append({"policy": policy, "current": current,
                         "versions": registry.versions(policy)})
        print(json.dumps(rows, indent=2))
    elif args.action == "show":
        version = (registry.get(args.policy, args.version) if args.version
                   else registry.current(args.policy))
        print(version.manifest.to_json())
    elif args.action == "rollback":
        version = registry.rollback(args.policy, args.version or None)
        print(f"{args.policy}: current version is now {version.version}")
    return 0


def _admin(args: argparse.Namespace) -> int:
    import grpc

    from protos import decision_pb2 as pb
    from protos import decision_pb2_grpc as pb_grpc

    if args.tls_ca is not None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=args.tls_ca.read_bytes(),
            private_key=args.tls_key.read_bytes() if args.tls_key else None,
            certificate_chain=args.tls_cert.read_bytes() if args.tls_cert else None)
        channel = grpc.secure_channel(args.target, credentials)
    else:
        channel = grpc.insecure_channel(args.target)
    token = args.token or os.environ.get("POLICYLOOP_TOKEN", "")
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with channel:
        stub = pb_grpc.AdminServiceStub(channel)
        if args.action == "pin":
            info = stub.Pin(pb.PinRequest(policy=args.policy, version=args.version), timeout=30,
                            metadata=metadata)
        elif args.action == "unpin":
            info = stub.Unpin(pb.UnpinRequest(policy=args.policy), timeout=30,
                              metadata=metadata)
        else:
            info = stub.Rollback(pb.RollbackRequest(policy=args.policy, version=args.version),
                                 timeout=30, metadata=metadata)
    print(f"{info.policy}: serving version {info.model_version} (pinned={info.pinned})")
    return 0


def _topics(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from policyloop.bus.topics import DEFAULT_TOPICS, create_topics

    # The models topic keeps one partition: it is a compacted log of versions, read whole.
    specs = [spec if spec.compact else replace(spec, partitions=args.partitions)
             for spec in DEFAULT_TOPICS]
    created = create_topics(args.kafka, specs, timeout=args.timeout)
    for spec in specs:
        state = "created" if spec.name in created else "exists"
        print(f"{spec.name}: partitions={spec.partitions} retention_ms={spec.retention_ms} "
              f"compact={spec.compact} ({state})")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from policyloop.evaluate import evaluate_command

    return evaluate_command(args.log, target_column=args.target_column,
                            registry=args.registry, policy=args.policy, version=args.version,
                            strategy=args.strategy, clip=args.clip, alpha=args.alpha,
                            as_json=args.json)


def _learn(args: argparse.Namespace) -> int:
    from online.config import LearnConfig
    from online.learner import Learner
    from online.shards import parse_shard

    shard_index, shard_count = parse_shard(args.shard)
    config = LearnConfig(
        registry=args.registry, policy=args.policy, registry_kafka=args.registry_kafka or "",
        bus=args.bus, bus_path=args.bus_path,
        kafka_bootstrap=args.kafka or "", partitions=args.partitions, group=args.group,
        from_latest=args.from_latest, shard_index=shard_index, shard_count=shard_count,
        checkpoint=args.checkpoint, window_ms=args.window_ms,
        default_reward=args.default_reward, reward_rule=args.reward_rule,
        publish_every=args.publish_every, publish_interval_s=args.publish_interval,
        gamma=args.gamma, discount=args.discount, prior=args.prior, gate=not args.no_gate,
        gate_margin=args.gate_margin, max_examples=args.max_examples,
        idle_exit_s=args.idle_exit)
    learner = Learner(config) if args.network is None else _network_learner(config, args)
    if args.metrics_port is not None:
        from online.metrics import serve_metrics

        server = serve_metrics(learner, args.metrics_host, args.metrics_port)
        print(f"policyloop learn: metrics={args.metrics_host}:{server.server_port}", flush=True)
    # SIGTERM (Kubernetes, the demo) ends the loop cleanly: what was learned is published and
    # checkpointed below; events still waiting for their reward stay in the checkpoint.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: learner.stop())
    try:
        learner.run(on_ready=lambda: print(f"policyloop learn: consuming policy={args.policy}",
                                           flush=True))
        learner.finish()
    finally:
        learner.close()
    print(json.dumps({"examples": learner.examples, "published": learner.published,
                      "joiner": vars(learner.joiner.stats)}))
    return 0


def _network_learner(config: LearnConfig, args: argparse.Namespace) -> Learner:
    """``learn --network``: needs torch, so only the trainer image runs it."""
    from models.network_learner import NetworkLearner

    return NetworkLearner(config, args.network, epochs=args.network_epochs, replay=args.replay)


def _demo(args: argparse.Namespace) -> int:
    from policyloop.demo import DemoConfig, demo_command

    return demo_command(DemoConfig(
        scenario=args.scenario, kafka=args.kafka or "", drift=args.drift, events=args.events,
        workdir=args.workdir, png=args.png, seed=args.seed, strategy=args.strategy,
        concurrency=args.concurrency, rate=args.rate, live=not args.no_live))


def _simulate(args: argparse.Namespace) -> int:
    from policyloop.simulate import TrafficConfig, simulate_command

    return simulate_command(TrafficConfig(
        target=args.target, scenario=args.scenario, policy=args.policy or "",
        events=args.events, rate=args.rate, concurrency=args.concurrency,
        reward_delay_ms=args.reward_delay_ms, reward_loss=args.reward_loss,
        drift_at=args.drift_at, seed=args.seed, world_seed=args.world_seed,
        timeout_s=args.timeout, token=args.token or os.environ.get("POLICYLOOP_TOKEN", "")),
        as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="policyloop",
        description="Real-time decisions that learn online: train, serve, learn, evaluate.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="text lines, or one JSON object per line (default text)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a policy offline from simulated logged data",
                       description="Collect logged bandit data from a simulator under a "
                       "logging policy with known propensities, train a neural-linear policy "
                       "with an IPS/DR objective, then export it to ONNX and register it.")
    p.add_argument("--scenario", choices=["recsys", "routing"], required=True)
    p.add_argument("--registry", type=Path, default=Path("var/registry"),
                   help="model registry folder (default var/registry; with --registry-kafka: "
                   "this process's cache)")
    p.add_argument("--registry-kafka", metavar="HOST:PORT",
                   help="publish to the Kafka-backed registry (compacted topic 'models')")
    p.add_argument("--policy", help="policy name to register under (default: the scenario)")
    p.add_argument("--n-logged", type=int, default=20_000, help="logged events to train on")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--objective", choices=["ips", "dr"], default="dr")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", type=Path,
                   help="also save the torch checkpoint here (needed by `export`)")
    p.add_argument("--no-export", action="store_true",
                   help="train only; do not export or register (use with --checkpoint)")
    p.set_defaults(func=_train)

    p = sub.add_parser("export", help="export a trained checkpoint to ONNX and register it",
                       description="Export to ONNX (dynamic batch axis, pinned opset), check "
                       "torch/onnxruntime parity within 1e-5, and register the version.")
    p.add_argument("checkpoint", type=Path, help="torch checkpoint written by `train`")
    p.add_argument("--registry", type=Path, default=Path("var/registry"),
                   help="registry folder (with --registry-kafka: this process's cache)")
    p.add_argument("--registry-kafka", metavar="HOST:PORT",
                   help="publish to the Kafka-backed registry (compacted topic 'models')")
    p.add_argument("--policy", help="policy name (default: the checkpoint's scenario)")
    p.add_argument("--out", type=Path, help="also write model.onnx and manifest.json here")
    p.set_defaults(func=_export)

    p = sub.add_parser("serve", help="run the gRPC decision server",
                       description="Serve every registered policy (or those named) over gRPC: "
                       "DecisionService, AdminService, the v2 inference protocol, health and "
                       "reflection; metrics over HTTP. Port 0 picks a free port; the chosen "
                       "ports are printed on one line at start-up.")
    p.add_argument("--config", type=Path, help="TOML file with ServeConfig fields")
    p.add_argument("--registry", type=Path,
                   help="registry folder (with --registry-kafka: this replica's cache)")
    p.add_argument("--registry-kafka", metavar="HOST:PORT",
                   help="read models from the Kafka-backed registry (compacted topic)")
    p.add_argument("--host")
    p.add_argument("--port", type=int, help="gRPC port (default 50051; 0 = any free port)")
    p.add_argument("--metrics-port", type=int,
                   help="Prometheus port (default 9464; 0 = any free port)")
    p.add_argument("--policy", action="append", metavar="NAME[=STRATEGY]",
                   help="serve this policy, optionally with its exploration strategy "
                   "(greedy, epsilon_greedy:E, softmax:T, squarecb:G, ucb:A, thompson[:M]); "
                   "repeatable; default: every policy in the registry")
    p.add_argument("--strategy", help="default exploration strategy")
    p.add_argument("--apprentice", action="append", metavar="NAME",
                   help="run this policy in apprentice mode (repeatable)")
    p.add_argument("--bus", choices=["local", "kafka"])
    p.add_argument("--bus-path", type=Path, help="local event log folder (bus=local)")
    p.add_argument("--kafka", help="Kafka bootstrap HOST:PORT (bus=kafka)")
    p.add_argument("--spool-dir", type=Path, help="where decisions wait while the bus is down")
    p.add_argument("--log-writer", choices=["thread", "process"],
                   help="write the decision log from a thread of the server (default) or from "
                   "a child process, outside the server's interpreter lock")
    p.add_argument("--micro-batch", type=int, metavar="N",
                   help="decide up to N concurrent Decide calls together (default 32; 1 "
                   "turns micro-batching off)")
    p.add_argument("--micro-batch-wait-ms", type=float, metavar="MS",
                   help="longest a Decide call waits for its micro-batch to fill (default 1); "
                   "while waiting batches stay near one call, calls do not wait")
    p.add_argument("--grace", type=float, help="drain period on SIGTERM, seconds")
    p.add_argument("--watch-interval", type=float, help="registry poll interval, seconds")
    p.add_argument("--durable-ack", action="store_true",
                   help="answer Decide/Reward/Activate only once the event is on the bus or in "
                   "the spool file, so a killed server loses no acknowledged event")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve gRPC over TLS")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", type=Path,
                   help="PEM CA bundle: require client certificates it signed (mutual TLS)")
    p.add_argument("--tokens-file", type=Path,
                   help="TOML file of bearer tokens and their scopes (decide, reward, admin)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("registry", help="inspect the model registry or roll a policy back")
    p.add_argument("action", choices=["list", "show", "rollback"])
    p.add_argument("--registry", type=Path, default=Path("var/registry"))
    p.add_argument("--policy")
    p.add_argument("--version", type=int, default=0,
                   help="version (show: default current; rollback: default previous)")
    p.set_defaults(func=_registry)

    p = sub.add_parser("admin", help="pin, unpin or roll back the version a server serves")
    p.add_argument("action", choices=["pin", "unpin", "rollback"])
    p.add_argument("--target", default="127.0.0.1:50051", help="server HOST:PORT")
    p.add_argument("--policy", required=True)
    p.add_argument("--version", type=int, default=0)
    p.add_argument("--token", help="bearer token with the admin scope (default: "
                   "$POLICYLOOP_TOKEN)")
    p.add_argument("--tls-ca", type=Path, help="PEM CA that signed the server's certificate")
    p.add_argument("--tls-cert", type=Path, help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, help="client private key (mutual TLS)")
    p.set_defaults(func=_admin)

    p = sub.add_parser("learn", help="join rewards and refresh a policy online",
                       description="Consume decisions, rewards and activations from the bus, "
                       "join them within the reward window, update the neural-linear head "
                       "(Bayesian linear regression with optional forgetting), and publish a "
                       "version every N examples or T seconds, promoted only if off-policy "
                       "evaluation on held-out events does not find it worse.")
    p.add_argument("--registry", type=Path, default=Path("var/registry"))
    p.add_argument("--policy", required=True)
    p.add_argument("--registry-kafka", metavar="HOST:PORT",
                   help="publish to the Kafka-backed registry (--registry is then its cache)")
    p.add_argument("--bus", choices=["local", "kafka"], default="local")
    p.add_argument("--bus-path", type=Path, default=Path("var/bus"))
    p.add_argument("--kafka", help="Kafka bootstrap HOST:PORT (bus=kafka)")
    p.add_argument("--partitions", type=int, default=4,
                   help="partitions of the event topics: the join waits for each of them, so "
                   "on Kafka this must equal the topics' partition count (default 4)")
    p.add_argument("--group", default="policyloop-learner", help="consumer group")
    p.add_argument("--from-latest", action="store_true",
                   help="Kafka: a group without committed offsets starts at the end of the "
                   "topics (skip the history) instead of the beginning")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="scale-out: this learner is shard I of N and reads partitions p with "
                   "p %% N == I; shard 0 publishes, merging the others' statistics (each shard "
                   "its own --checkpoint; N at most the topics' partitions). Default 0/1")
    p.add_argument("--checkpoint", type=Path, default=Path("var/learner/checkpoint.json"))
    p.add_argument("--window-ms", type=int, default=30_000, help="reward window")
    p.add_argument("--default-reward", type=float, default=0.0)
    p.add_argument("--reward-rule", choices=["first", "sum"], default="first")
    p.add_argument("--publish-every", type=int, default=500, help="examples per version")
    p.add_argument("--publish-interval", type=float, default=30.0, help="seconds per version")
    p.add_argument("--gamma", type=float, default=1.0, help="forgetting factor (1 = none)")
    p.add_argument("--discount", type=float, default=0.0,
                   help="Q-learning discount in [0, 1) for sequential decisions with a fixed "
                   "action set (routing): targets r + discount * max Q of the next decision, "
                   "DQN-style target head synced at each promotion; 0 = contextual bandit. "
                   "Use with forgetting (--gamma < 1) so targets of older heads fade")
    p.add_argument("--prior", type=float, default=1.0, help="ridge prior strength")
    p.add_argument("--network", type=Path, metavar="CHECKPOINT",
                   help="refit the whole torch network (IPS then DR, from this `train "
                   "--checkpoint` of the serving version) at each publish instead of the "
                   "linear head; slower, needs torch")
    p.add_argument("--network-epochs", type=int, default=2,
                   help="with --network: passes over the replay window per publish")
    p.add_argument("--replay", type=int, default=20_000,
                   help="with --network: the latest joined examples trained on")
    p.add_argument("--no-gate", action="store_true", help="promote without the OPE gate")
    p.add_argument("--gate-margin", type=float, default=0.01)
    p.add_argument("--metrics-port", type=int,
                   help="serve Prometheus metrics on /metrics and readiness on /healthz "
                   "(0 = any port)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address the metrics port binds (default: %(default)s; 0.0.0.0 in a "
                   "pod, for the scraper)")
    p.add_argument("--max-examples", type=int, help="stop after this many examples")
    p.add_argument("--idle-exit", type=float,
                   help="stop after the bus has been drained for this many seconds; on Kafka, "
                   "exit 2 if no partition was assigned within max(this, 20) seconds")
    p.set_defaults(func=_learn)

    p = sub.add_parser("evaluate", help="off-policy estimates (IPS, SNIPS, DR) on a log",
                       description="Estimate a target policy's value from logged bandit "
                       "feedback (CSV or JSONL: action, reward, propensity, context features "
                       "x0..xN or a 'context' list, optional candidates and position). The "
                       "target is a column with its probability of the logged action, or a "
                       "registered model version with an exploration strategy.")
    p.add_argument("log", type=Path, help="CSV or JSONL file of logged events")
    p.add_argument("--target-column", help="column: target policy's probability of the "
                   "logged action")
    p.add_argument("--registry", type=Path, default=Path("var/registry"))
    p.add_argument("--policy", help="registered policy to evaluate as the target")
    p.add_argument("--version", type=int, help="its version (default: current)")
    p.add_argument("--strategy", default="greedy",
                   help="exploration the target would serve with (default greedy)")
    p.add_argument("--clip", type=float, help="clip importance weights at this value")
    p.add_argument("--alpha", type=float, default=0.05, help="1 - confidence level")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("topics", help="create the Kafka topics (idempotent)",
                       description="Create decisions, rewards, activations and examples "
                       "(time retention) and the compacted models topic.")
    p.add_argument("--kafka", required=True, help="bootstrap HOST:PORT")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--timeout", type=float, default=30.0)
    p.set_defaults(func=_topics)

    p = sub.add_parser("demo", help="the closed loop on one machine: train, serve, learn, "
                       "simulate traffic, show that the policy improves",
                       description="Train a start policy offline, start `policyloop serve` and "
                       "`policyloop learn` as processes (embedded log and registry, or Kafka), "
                       "drive simulated traffic through gRPC with delayed and missing rewards, "
                       "then compare uniform random, the start policy, the final online policy "
                       "and the oracle by true expected reward, and draw the learning curve "
                       "(PNG).")
    p.add_argument("--scenario", choices=["recsys", "routing"], default="recsys")
    p.add_argument("--kafka", metavar="HOST:PORT",
                   help="run the loop on this Kafka broker instead of the embedded log")
    p.add_argument("--drift", action="store_true",
                   help="switch the simulator's preferences halfway; the learner forgets "
                   "(gamma 0.999) to recover")
    p.add_argument("--events", type=int, default=0,
                   help="decisions to serve (default 16000 recsys, 10000 routing; half as "
                   "many again with --drift)")
    p.add_argument("--workdir", type=Path, default=Path("var/demo"),
                   help="registry, event log, logs and summary.json go to WORKDIR/SCENARIO")
    p.add_argument("--png", type=Path, help="learning curve path "
                   "(default WORKDIR/SCENARIO/learning_curve.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategy", default="epsilon_greedy:0.05",
                   help="exploration strategy served (default epsilon_greedy:0.05)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--rate", type=float, default=0.0,
                   help="decisions per second (default 0: as fast as the server answers)")
    p.add_argument("--no-live", action="store_true", help="no live progress display")
    p.set_defaults(func=_demo)

    p = sub.add_parser("simulate", help="send simulated app traffic to a running server",
                       description="Act as an app: Decide for simulated users or tickets, "
                       "then Reward after a random delay (some rewards never sent); print "
                       "what was sent and the true expected reward of the decisions. Exit "
                       "status 1 if any call failed.")
    p.add_argument("--target", required=True, help="server HOST:PORT")
    p.add_argument("--scenario", choices=["recsys", "routing"], default="recsys")
    p.add_argument("--policy", help="served policy name (default: the scenario)")
    p.add_argument("--events", type=int, default=10_000, help="decisions to make")
    p.add_argument("--rate", type=float, default=0.0,
                   help="decisions per second (default 0: as fast as the server answers)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--reward-delay-ms", type=float, default=200.0,
                   help="mean delay of a reward report (exponential)")
    p.add_argument("--reward-loss", type=float, default=0.05,
                   help="fraction of reward reports never sent")
    p.add_argument("--drift-at", type=int, help="switch preferences after this many decisions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world-seed", type=int, default=0,
                   help="the simulator's world; must be the one the policy was trained on")
    p.add_argument("--timeout", type=float, default=5.0, help="per-call deadline, seconds")
    p.add_argument("--token", help="bearer token with the decide and reward scopes (default: "
                   "$POLICYLOOP_TOKEN)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        return int(args.func(args) or 0)
    except PolicyloopError as exc:
        print(f"policyloop {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
