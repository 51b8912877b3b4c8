"""The ``policyloop`` command: one entry point, a subcommand per process or task.

Each subcommand builds its one typed configuration object here and hands it to the code that
runs it. The flags of ``train``, ``serve``, ``learn``, ``demo`` and ``simulate`` are derived
from their config dataclasses, which state every default once; the same settings come from a
TOML file (``--config``) and ``POLICYLOOP_<FIELD>`` variables (``policyloop/contract/settings.py``).
A subcommand's flags are added only when it runs or shows its help, and heavy imports (torch,
grpc) happen inside the handlers, so ``policyloop serve`` never imports torch and ``--help``
stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from policyloop.contract import settings
from policyloop.contract.errors import PolicyloopError
from policyloop.logs import setup_logging

if TYPE_CHECKING:
    from online.config import LearnConfig
    from online.learner import Learner
    from serving.config import ServeConfig


def _train(args: argparse.Namespace) -> int:
    from models.training import TrainConfig, train_command

    cfg = settings.load(TrainConfig, args, environ=os.environ)
    if args.spec is not None:
        from policyloop.contract.spec import load_spec
        from policyloop.create import check_exploration

        check_exploration(load_spec(args.spec), args.spec)
    return train_command(cfg, registry=None if args.no_export else args.registry,
                         policy=args.policy, checkpoint=args.checkpoint,
                         registry_kafka=args.registry_kafka or "", spec=args.spec,
                         data=args.data)


def _create(args: argparse.Namespace) -> int:
    from policyloop.create import create_command

    return create_command(args.spec, registry=args.registry,
                          registry_kafka=args.registry_kafka or "", prior=args.prior,
                          force=args.force, seed=args.seed)


def _import(args: argparse.Namespace) -> int:
    from policyloop.import_model import import_command

    return import_command(args.model, spec_path=args.spec, registry=args.registry,
                          registry_kafka=args.registry_kafka or "",
                          head_weight=args.head_weight or "", head_bias=args.head_bias or "",
                          prior=args.prior, force=args.force)


def _export(args: argparse.Namespace) -> int:
    from models.export import export_command

    return export_command(args.checkpoint, registry=args.registry,
                          policy=args.policy, out=args.out,
                          registry_kafka=args.registry_kafka or "")


def serve_config(args: argparse.Namespace, environ: Mapping[str, str]) -> ServeConfig:
    """``serve``'s config: its settings, then the policies ``--policy`` names, each with its
    strategy (none: its spec's, else ``default_strategy``), in apprentice mode if
    ``--apprentice`` names it."""
    from serving.config import PolicyConfig, ServeConfig, load_serve_config

    flags = {f.name: getattr(args, f.name) for f in settings.settings(ServeConfig)}
    config = load_serve_config(args.config, flags, environ)
    if args.policy:
        config = replace(config, policies={
            name: PolicyConfig(strategy=spec,
                               apprentice=name in (args.apprentice or []))
            for name, _, spec in (p.partition("=") for p in args.policy)})
    return config


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from serving.server import serve

    return asyncio.run(serve(serve_config(args, os.environ)))


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
    from policyloop.channels import open_channel
    from protos import decision_pb2 as pb
    from protos import decision_pb2_grpc as pb_grpc

    channel = open_channel(args.target, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                           tls_key=args.tls_key)
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
                            as_json=args.json, spec_path=args.spec, target=args.target or "",
                            token=args.token or os.environ.get("POLICYLOOP_TOKEN", ""),
                            tls=(args.tls_ca, args.tls_cert, args.tls_key))


def _tls_flags(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The TLS flags of a command that calls a running server (``policyloop/channels.py``)."""
    p.add_argument("--tls-ca", type=Path, help=f"{prefix}PEM CA that signed the server's "
                   "certificate (TLS; without it, plaintext)")
    p.add_argument("--tls-cert", type=Path, help=f"{prefix}client certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, help=f"{prefix}client private key (mutual TLS)")


_SHARD = ("shard_index", "shard_count")  # LearnConfig fields set by --shard I/N


def learn_config(args: argparse.Namespace, environ: Mapping[str, str]) -> LearnConfig:
    from online.config import LearnConfig
    from online.shards import parse_shard

    shard = dict(zip(_SHARD, parse_shard(args.shard), strict=True)) if args.shard else {}
    return settings.load(LearnConfig, args, environ=environ, skip=_SHARD, **shard)


def _learn(args: argparse.Namespace) -> int:
    from online.learner import Learner

    config = learn_config(args, os.environ)
    learner = Learner(config) if config.network is None else _network_learner(config)
    if config.metrics_port is not None:
        from online.metrics import serve_metrics

        server = serve_metrics(learner, config.metrics_host, config.metrics_port)
        print(f"policyloop learn: metrics={config.metrics_host}:{server.server_port}",
              flush=True)
    # SIGTERM (Kubernetes, the demo) ends the loop cleanly: what was learned is published and
    # checkpointed below; events still waiting for their reward stay in the checkpoint.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: learner.stop())
    try:
        joiner = learner.joiner
        learner.run(on_ready=lambda: print(
            f"policyloop learn: consuming policy={config.policy} window_ms={joiner.window_ms} "
            f"default_reward={joiner.default_reward:g} reward_rule={joiner.reward_rule}",
            flush=True))
        learner.finish()
    finally:
        learner.close()
    print(json.dumps({"examples": learner.examples, "published": learner.published,
                      "joiner": vars(learner.joiner.stats)}))
    return 0


def _network_learner(config: LearnConfig) -> Learner:
    """``learn --network``: needs torch, so only the trainer image runs it."""
    from models.network_learner import network_learner
    from online.learner import Learner

    assert config.network is not None
    return Learner(config, network_learner(
        config.network, epochs=config.network_epochs, replay=config.replay,
        clip=config.network_clip, lr=config.network_lr, seed=config.network_seed))


def _demo(args: argparse.Namespace) -> int:
    from policyloop.demo import DemoConfig, demo_command

    return demo_command(settings.load(DemoConfig, args, environ=os.environ))


def _simulate(args: argparse.Namespace) -> int:
    from policyloop.simulate import TrafficConfig, simulate_command

    return simulate_command(settings.load(TrafficConfig, args, environ=os.environ),
                            as_json=args.json)


class _Command(argparse.ArgumentParser):
    """A subcommand's parser that adds its flags (``add_flags``) when first used: they come
    from its config dataclass, and importing every command's (train's imports torch, which the
    serving image lacks) to run one would be slow or fail."""

    def __init__(self, *args: Any,
                 add_flags: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._add_flags = add_flags

    def _flags(self) -> None:
        add_flags, self._add_flags = self._add_flags, None
        if add_flags is not None:
            add_flags(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._flags()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._flags()
        return super().format_help()

    def format_usage(self) -> str:
        self._flags()
        return super().format_usage()


def _train_flags(p: argparse.ArgumentParser) -> None:
    from models.training import TrainConfig

    settings.add_flags(p, TrainConfig)
    p.add_argument("--registry", type=Path, default=Path("var/registry"),
                   help="model registry folder (default var/registry; with --registry-kafka: "
                   "this process's cache)")
    p.add_argument("--registry-kafka", metavar="HOST:PORT",
                   help="publish to the Kafka-backed registry (compacted topic 'models')")
    p.add_argument("--policy", help="policy name to register under (default: the scenario, "
                   "or the spec's name)")
    p.add_argument("--spec", type=Path, help="with --data: the policy spec (TOML) naming the "
                   "file's features and columns (policyloop/contract/spec.py)")
    p.add_argument("--data", type=Path, help="train on your own log instead of a simulator's: "
                   "CSV, JSONL or Parquet with action, reward, propensity, the context "
                   "features (ranking: candidates); bad rows are reported and dropped")
    p.add_argument("--checkpoint", type=Path,
                   help="also save the torch checkpoint here (needed by `export`)")
    p.add_argument("--no-export", action="store_true",
                   help="train only; do not export or register (use with --checkpoint)")


def _serve_flags(p: argparse.ArgumentParser) -> None:
    from serving.config import ServeConfig

    settings.add_flags(p, ServeConfig)
    p.add_argument("--policy", action="append", metavar="NAME[=STRATEGY]",
                   help="serve this policy, optionally with its exploration strategy "
                   "(greedy, epsilon_greedy:E, softmax:T, squarecb[:G[:X]], ucb:A, thompson[:M]; "
                   "default --strategy); repeatable; default: every policy in the registry, "
                   "and those published later (--model-control-mode); "
                   "replaces the file's [policies.NAME] tables")
    p.add_argument("--apprentice", action="append", metavar="NAME",
                   help="run this --policy in apprentice mode (repeatable)")


def _learn_flags(p: argparse.ArgumentParser) -> None:
    from online.config import LearnConfig

    settings.add_flags(p, LearnConfig, skip=_SHARD)
    p.add_argument("--shard", metavar="I/N",
                   help="scale-out: this learner is shard I of N and reads partitions p with "
                   "p %% N == I; shard 0 publishes, merging the others' statistics (each shard "
                   "its own --checkpoint; N at most the topics' partitions) (default: "
                   f"{LearnConfig.shard_index}/{LearnConfig.shard_count}; "
                   "POLICYLOOP_SHARD_INDEX, POLICYLOOP_SHARD_COUNT)")


def _demo_flags(p: argparse.ArgumentParser) -> None:
    from policyloop.demo import DemoConfig

    settings.add_flags(p, DemoConfig)


def _simulate_flags(p: argparse.ArgumentParser) -> None:
    from policyloop.simulate import TrafficConfig

    settings.add_flags(p, TrafficConfig)
    p.add_argument("--json", action="store_true", help="print JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="policyloop",
        description="Real-time decisions that learn online: train, serve, learn, evaluate.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="text lines, or one JSON object per line (default text)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Command)

    p = sub.add_parser("train", help="train a policy offline from logged data (yours or a "
                       "simulator's)",
                       description="Read your logged bandit data (--spec SPEC --data FILE) or "
                       "collect it from a simulator under a logging policy with known "
                       "propensities, train a neural-linear policy with an IPS/DR objective, "
                       "then export it to ONNX (parity checked on the logged rows) and "
                       "register it with a posterior fitted to them.",
                       add_flags=_train_flags)
    p.set_defaults(func=_train)

    p = sub.add_parser("create", help="start a policy from nothing: publish v1 from its spec",
                       description="Read a policy spec (TOML: name, kind, actions, features, "
                       "model; see policyloop/contract/spec.py) and publish its first version "
                       "with no data: a linear model (ranking: with context x candidate "
                       "products), or with [model] type = \"mlp\" a network of the spec's "
                       "sizes with a random body and a zero head, and the learner's prior as "
                       "its posterior, so UCB and Thompson sampling explore from the first "
                       "request and `learn` improves it from the first rewards. It is served "
                       "with Thompson sampling unless the spec's [exploration] names another "
                       "strategy (or serve's --policy NAME=STRATEGY does).")
    p.add_argument("spec", type=Path, help="the policy spec, a TOML file")
    p.add_argument("--registry", type=Path, default=Path("var/registry"),
                   help="registry folder (with --registry-kafka: this process's cache)")
    p.add_argument("--registry-kafka", metavar="HOST:PORT",
                   help="publish to the Kafka-backed registry (compacted topic 'models')")
    p.add_argument("--prior", type=float, default=1.0,
                   help="ridge prior of the head, as `learn --prior` (default 1.0)")
    p.add_argument("--force", action="store_true",
                   help="publish a fresh start even if the policy already has versions")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of an mlp's random body (default 0)")
    p.set_defaults(func=_create)

    p = sub.add_parser("import", help="bring your own model: check an ONNX file against a "
                       "spec and publish it",
                       description="Check an ONNX file against a policy spec and the model "
                       "contract (docs/model-contract.md: inputs, outputs, shapes per kind), "
                       "find its learnable head (the last linear layer, by name or by "
                       "structure), open it with serving's checks and publish it with the "
                       "learner's prior around its head, so UCB and Thompson sampling work and "
                       "`learn` refreshes it. A model without a head is published too: served, "
                       "never learned.")
    p.add_argument("model", type=Path, help="the ONNX file")
    p.add_argument("--spec", type=Path, required=True,
                   help="the policy spec, a TOML file (as for `create`)")
    p.add_argument("--registry", type=Path, default=Path("var/registry"),
                   help="registry folder (with --registry-kafka: this process's cache)")
    p.add_argument("--registry-kafka", metavar="HOST:PORT",
                   help="publish to the Kafka-backed registry (compacted topic 'models')")
    p.add_argument("--head-weight", metavar="NAME",
                   help="the initializer holding the head's weight (default: found by "
                   "structure)")
    p.add_argument("--head-bias", metavar="NAME", help="the initializer holding the head's bias")
    p.add_argument("--prior", type=float, default=1.0,
                   help="ridge prior of the head, as `learn --prior` (default 1.0)")
    p.add_argument("--force", action="store_true",
                   help="publish even if the policy already has versions")
    p.set_defaults(func=_import)

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
                       "ports are printed on one line at start-up.",
                       add_flags=_serve_flags)
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
    _tls_flags(p)
    p.set_defaults(func=_admin)

    p = sub.add_parser("learn", help="join rewards and refresh a policy online",
                       description="Consume decisions, rewards and activations from the bus, "
                       "join them within the reward window, update the neural-linear head "
                       "(Bayesian linear regression with optional forgetting), and publish a "
                       "version every N examples or T seconds, promoted only if off-policy "
                       "evaluation on held-out events does not find it worse.",
                       add_flags=_learn_flags)
    p.set_defaults(func=_learn)

    p = sub.add_parser("evaluate", help="off-policy estimates (IPS, SNIPS, DR) on a log",
                       description="Estimate a target policy's value from logged bandit "
                       "feedback (CSV or JSONL: action, reward, propensity, context features "
                       "x0..xN or a 'context' list, optional candidates and position). The "
                       "target is a column with its probability of the logged action, a "
                       "registered model version with an exploration strategy, or what a "
                       "running server serves (--target).")
    p.add_argument("log", type=Path, help="CSV or JSONL file of logged events (with --spec: "
                   "CSV, JSONL or Parquet in the spec's columns)")
    p.add_argument("--spec", type=Path, help="read the log in this policy spec's columns, "
                   "as `train --spec` does; the target defaults to the spec's policy")
    p.add_argument("--target-column", help="column: target policy's probability of the "
                   "logged action")
    p.add_argument("--registry", type=Path, default=Path("var/registry"))
    p.add_argument("--policy", help="registered policy to evaluate as the target")
    p.add_argument("--version", type=int, help="its version (default: current)")
    p.add_argument("--strategy", default="greedy",
                   help="exploration the target would serve with (default greedy)")
    p.add_argument("--target", metavar="HOST:PORT",
                   help="evaluate what this running server serves: the version and strategy "
                   "its GetPolicyInfo names, read from --registry (instead of --version and "
                   "--strategy)")
    p.add_argument("--token", help="with --target: bearer token (default $POLICYLOOP_TOKEN)")
    _tls_flags(p, "with --target: ")
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
                       "(PNG).",
                       add_flags=_demo_flags)
    p.set_defaults(func=_demo)

    p = sub.add_parser("simulate", help="send simulated app traffic to a running server, "
                       "or write a simulator's logs to a file",
                       description="Act as an app: Decide for simulated users or tickets, "
                       "then Reward after a random delay (some rewards never sent); print "
                       "what was sent and the true expected reward of the decisions. Exit "
                       "status 1 if any call failed. With --log-to FILE, no server: write "
                       "EVENTS decisions of --logging-policy to FILE and the scenario's spec "
                       "to FILE.spec.toml, for `train --spec --data`.",
                       add_flags=_simulate_flags)
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
    except OSError as exc:  # a file it was given (TLS key, tokens, a path under a regular
        # file, a full disk): say which and why in one line; the traceback is for --log-level
        # DEBUG
        logging.getLogger(__name__).debug("%s failed", args.command, exc_info=True)
        where = f": {exc.filename}" if exc.filename else ""
        print(f"policyloop {args.command}: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
