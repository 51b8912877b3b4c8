"""``policyloop demo``: the whole loop on one machine, and proof that it learns.

1. Train a start policy offline from a small log (a team's first model), export it to ONNX and
   register it as version 1.
2. Start ``policyloop serve`` and ``policyloop learn`` as separate processes, as deployed: on the
   embedded defaults (local event log, local registry) or, with ``kafka``, on a Kafka broker.
3. Drive simulated app traffic through the client library, as an app would
   (``policyloop/simulate.py``): Decide, then Reward after a delay, some rewards never sent;
   optionally switch the simulator's preferences halfway (``drift``).
4. Score every version the learner promoted by its true expected reward on fresh simulated
   arrivals (the simulator knows the truth), print a summary against uniform random, the start
   policy and the oracle, and draw the learning curve.

The start and final policies are compared on the same arrivals (a paired test), so the reported
improvement comes with its standard error.
"""

from __future__ import annotations

import asyncio
import json
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from policyloop.contract.errors import InvalidArgument, Unavailable
from policyloop.contract.settings import setting
from policyloop.registry.local import LocalRegistry
from policyloop.registry.onnx_model import LoadedModel, load_model
from policyloop.simulate import Traffic, TrafficConfig, make_simulator, run_traffic

EVAL_ARRIVALS = 4000


@dataclass(frozen=True)
class DemoConfig:
    scenario: str = setting("recsys", "simulator and policy", choices=("recsys", "routing"))
    kafka: str = setting("", "run the loop on this Kafka broker; empty: the embedded log",
                         metavar="HOST:PORT")
    drift: bool = setting(False, "switch the simulator's preferences halfway; the learner "
                          "forgets (gamma 0.999) to recover")
    events: int = setting(0, "decisions to serve; 0: 16000 recsys, 10000 routing, half as "
                          "many again with --drift")
    workdir: Path = setting(Path("var/demo"), "registry, event log, logs and summary.json go "
                            "to WORKDIR/SCENARIO")
    png: Path | None = setting(None, "learning curve path; unset: "
                               "WORKDIR/SCENARIO/learning_curve.png")
    seed: int = setting(0, "seed of the start policy, the traffic and the evaluation")
    start_logged: int = setting(0, "logged events the start policy is trained on; 0: 1000 "
                                "recsys, 500 routing")
    strategy: str = setting("epsilon_greedy:0.05", "exploration strategy served")
    concurrency: int = setting(8, "requests in flight")
    rate: float = setting(0.0, "decisions per second; 0: as fast as the server answers")
    window_ms: int = setting(1000, "reward window of the join (rewards come after ~0.2 s)")
    publish_every: int = setting(300, "examples per version the learner publishes")
    live: bool = setting(True, "the rich progress display (--no-live for tests and pipes)")

    def __post_init__(self) -> None:
        if self.scenario not in ("recsys", "routing"):
            raise InvalidArgument(f"scenario must be recsys or routing, got {self.scenario!r}")
        if self.events < 0:
            raise InvalidArgument(f"events must be >= 0, got {self.events}")

    @property
    def n_events(self) -> int:
        default = 16_000 if self.scenario == "recsys" else 10_000
        return self.events or (default * 3 // 2 if self.drift else default)

    @property
    def n_start_logged(self) -> int:
        return self.start_logged or (1000 if self.scenario == "recsys" else 500)

    @property
    def gamma(self) -> float:
        """With drift, forget: an example's weight halves after ~700 newer ones."""
        return 0.999 if self.drift else 1.0


@dataclass
class Processes:
    server: subprocess.Popen
    learner: subprocess.Popen
    target: str

    def stop(self, timeout: float = 30.0) -> None:
        for proc in (self.learner, self.server):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (self.learner, self.server):
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "policyloop.cli", "--log-level", "WARNING", *args]


def start_process(cmd: list[str], marker: str, log_path: Path,
                  timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Start a process whose stdout announces readiness with a line containing ``marker``;
    stderr goes to ``log_path`` (kept for debugging). Fails after ``timeout`` seconds."""
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:  # drains stdout for the process's whole life, so it never blocks
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if marker in line:
            return proc, line.strip()
    proc.kill()
    raise Unavailable(f"{' '.join(cmd[3:5])} did not start within {timeout:.0f} s; "
                      f"see {log_path}")


def train_start_policy(config: DemoConfig, registry: Path, policy: str) -> dict[str, Any]:
    """The offline start policy (needs torch, the ``train`` extra)."""
    from models.export import export_and_register
    from models.training import TrainConfig, train_offline

    result = train_offline(TrainConfig(scenario=config.scenario,
                                       n_logged=config.n_start_logged, seed=config.seed))
    export_and_register(result.model, result.env, LocalRegistry(registry), policy=policy,
                        training=result.summary, seed=config.seed)
    return result.summary


def start_loop(config: DemoConfig, run_dir: Path, policy: str) -> Processes:
    """``policyloop serve`` and ``policyloop learn`` on the run's registry and bus."""
    bus_args = (["--bus", "kafka", "--kafka", config.kafka] if config.kafka
                else ["--bus-path", str(run_dir / "bus")])
    server, line = start_process(
        _cli("serve", "--registry", str(run_dir / "registry"), "--port", "0",
             "--metrics-port", "0", "--spool-dir", str(run_dir / "spool"),
             "--watch-interval", "0.2", "--policy", f"{policy}={config.strategy}", *bus_args),
        "policyloop serve:", run_dir / "serve.log")
    target = line.split("grpc=")[1].split()[0]
    learner, _ = start_process(
        _cli("learn", "--registry", str(run_dir / "registry"), "--policy", policy,
             "--checkpoint", str(run_dir / "learner.json"), "--window-ms",
             str(config.window_ms), "--publish-every", str(config.publish_every),
             "--publish-interval", "2", "--gamma", str(config.gamma), "--metrics-port", "0",
             "--group", f"demo-{policy}", *bus_args,
             # the shared topics' history belongs to other runs; traffic starts once it listens
             *(["--from-latest"] if config.kafka else [])),
        "policyloop learn: consuming", run_dir / "learn.log")
    return Processes(server, learner, target)


def learner_state(run_dir: Path) -> dict[str, Any]:
    """The learner's last checkpoint (written atomically after every publish)."""
    try:
        return json.loads((run_dir / "learner.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def paired(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean of b - a over the same arrivals, its standard error and z."""
    diff = b - a
    se = float(diff.std(ddof=1) / np.sqrt(len(diff)))
    mean = float(diff.mean())
    return {"improvement": mean, "standard_error": se, "z": mean / se if se > 0 else 0.0}


class VersionScorer:
    """True value of each version as it starts serving: the mean expected reward of its greedy
    action over fixed fresh arrivals (before or after the drift, whichever it served in).

    Versions are read as soon as they serve, because the registry keeps only the last few.
    """

    def __init__(self, registry: LocalRegistry, policy: str, config: DemoConfig) -> None:
        self.registry, self.policy = registry, policy
        before = make_simulator(config.scenario)
        after = make_simulator(config.scenario)
        after.drift()
        rng_seed = config.seed + 777
        self.arrivals = {False: before.sample_arrivals(EVAL_ARRIVALS,
                                                       np.random.default_rng(rng_seed)),
                         True: after.sample_arrivals(EVAL_ARRIVALS,
                                                     np.random.default_rng(rng_seed))}
        self.models: dict[int, LoadedModel] = {}
        self.curve: list[dict[str, Any]] = []

    def model(self, version: int) -> LoadedModel:
        if version not in self.models:
            self.models[version] = load_model(self.registry.get(self.policy, version),
                                              expected=None, providers=["CPUExecutionProvider"])
        return self.models[version]

    def values(self, version: int, drifted: bool) -> np.ndarray:
        """Per arrival, the true expected reward of the version's greedy action."""
        arrivals, model = self.arrivals[drifted], self.model(version)
        if arrivals.action_features is None:
            scores, _ = model.run(arrivals.context)
        else:
            scores, _ = model.run(arrivals.context, arrivals.action_features)
        chosen = np.asarray(scores).argmax(axis=1)
        return arrivals.expected[np.arange(len(chosen)), chosen]

    def see(self, version: int, first_decision: int, drifted: bool, *,
            new: bool = True) -> None:
        """Score ``version`` from ``first_decision`` on; ``new`` False re-scores the serving
        version when the world changes under it (the drift)."""
        self.curve.append({"version": version, "first_decision": first_decision,
                           "value": float(self.values(version, drifted).mean()), "new": new})

    def final(self, final_version: int, drift_index: int | None) -> dict[str, Any]:
        drifted = drift_index is not None
        expected = self.arrivals[drifted].expected
        start, final = self.values(1, drifted), self.values(final_version, drifted)
        result: dict[str, Any] = {
            "uniform": float(expected.mean()), "oracle": float(expected.max(axis=1).mean()),
            "start": float(start.mean()), "final": float(final.mean()),
            "final_version": final_version, "versions": self.curve,
            "paired": paired(start, final)}
        if drifted:  # what the loop had learned when the world changed
            last = max((c for c in self.curve if c["new"] and c["first_decision"] < drift_index),
                       key=lambda c: c["first_decision"])
            start_before = self.values(1, False)
            result["before_drift"] = {
                "start": float(start_before.mean()), "version": last["version"],
                "value": last["value"],
                "paired": paired(start_before, self.values(last["version"], False))}
        return result


def _progress_table(traffic: Traffic, state: dict[str, Any], config: DemoConfig) -> Any:
    from rich.table import Table

    published = state.get("published", [])
    promoted = sum(1 for p in published if p.get("promoted"))
    table = Table(title=f"policyloop demo: {config.scenario}"
                  + (" on Kafka" if config.kafka else " (embedded log and registry)"))
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("decisions", f"{traffic.decisions:,} / {config.n_events:,}")
    table.add_row("decisions/s", f"{traffic.rate():,.0f}")
    table.add_row("rewards sent", f"{traffic.rewards_sent:,}")
    table.add_row("true reward rate (last 500)", f"{traffic.moving_average():.3f}")
    table.add_row("serving version", str(traffic.versions[-1] if traffic.versions else "-"))
    table.add_row("versions promoted / rejected",
                  f"{promoted} / {len(published) - promoted}")
    table.add_row("learner lag (decisions not yet learned)",
                  f"{max(0, traffic.decisions - int(state.get('examples', 0))):,}")
    if traffic.errors:
        table.add_row("errors", json.dumps(traffic.errors))
    return table


async def _drive(config: DemoConfig, target: str, policy: str, run_dir: Path,
                 traffic: Traffic, scorer: VersionScorer, drift_index: int | None) -> None:
    """Run the traffic; meanwhile score each version as it starts serving and, if live,
    redraw the progress table."""
    traffic_config = TrafficConfig(target=target, scenario=config.scenario, policy=policy,
                                   events=config.n_events, rate=config.rate,
                                   concurrency=config.concurrency, drift_at=drift_index,
                                   seed=config.seed)
    task = asyncio.create_task(run_traffic(traffic_config, traffic=traffic))
    seen = 0

    async def score_new() -> None:
        nonlocal seen
        known = {c["version"] for c in scorer.curve}
        versions = traffic.versions
        for index in range(seen, len(versions)):
            drifted = drift_index is not None and index >= drift_index
            if versions[index] not in known:
                known.add(versions[index])
                await asyncio.to_thread(scorer.see, versions[index], index, drifted)
            elif index == drift_index:
                await asyncio.to_thread(scorer.see, versions[index], index, True, new=False)
        seen = len(versions)

    live = None
    if config.live:
        from rich.live import Live

        live = Live(_progress_table(traffic, {}, config), refresh_per_second=4)
        live.start()
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            await score_new()
            if live is not None:
                live.update(_progress_table(traffic, learner_state(run_dir), config))
    finally:
        if live is not None:
            live.stop()
    task.result()


def plot(path: Path, traffic: Traffic, scores: dict[str, Any], drift_index: int | None,
         config: DemoConfig) -> None:
    """The learning curve: served decisions' true reward (moving average), each promoted
    version's greedy value, and the reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    expected = np.array(traffic.expected)
    window = 500
    if len(expected) >= window:
        smooth = np.convolve(expected, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window, len(expected) + 1), smooth, color="tab:blue", lw=1.5,
                label=f"served decisions, true reward (moving average of {window})")
    curve = scores["versions"]
    xs = [c["first_decision"] for c in curve] + [len(expected)]
    ys = [c["value"] for c in curve] + [curve[-1]["value"]] if curve else []
    if curve:
        ax.step(xs, ys, where="post", color="tab:green", lw=2,
                label="serving version, greedy true value")
        promoted = [c for c in curve if c["new"]]
        ax.plot([c["first_decision"] for c in promoted], [c["value"] for c in promoted], "|",
                color="tab:green", ms=12,
                label=f"new version starts serving ({len(promoted)} served)")
    ax.axhline(scores["oracle"], color="black", ls="--", lw=1, label="oracle")
    ax.axhline(scores["start"], color="tab:orange", ls=":", lw=1.5,
               label="start policy (offline)" + (", after drift" if drift_index else ""))
    ax.axhline(scores["uniform"], color="gray", ls="-.", lw=1, label="uniform random")
    if drift_index is not None:
        ax.axvline(drift_index, color="tab:red", lw=1.5, label="drift")
    ax.set_xlabel("decisions served")
    ax.set_ylabel("true expected reward per decision"
                  + (" (click rate)" if config.scenario == "recsys" else " (resolved in SLA)"))
    ax.set_title(f"policyloop demo: {config.scenario}, online learning"
                 + (" on Kafka" if config.kafka else ""))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(scores: dict[str, Any], decisions: int, rate: float) -> Any:
    from rich.table import Table

    table = Table(title="true expected reward per decision (greedy, fresh arrivals)")
    for column in ("policy", "reward rate", "regret vs oracle"):
        table.add_column(column, justify="right" if column != "policy" else "left")
    oracle = scores["oracle"]
    rows = [("uniform random", scores["uniform"]),
            ("start policy (offline, v1)", scores["start"]),
            (f"final online policy (v{scores['final_version']})", scores["final"]),
            ("oracle", oracle)]
    for name, value in rows:
        table.add_row(name, f"{value:.4f}", f"{oracle - value:.4f}")
    p = scores["paired"]
    table.caption = (f"final - start: {p['improvement']:+.4f} +/- {p['standard_error']:.4f} "
                     f"(z = {p['z']:.1f}); served {decisions:,} decisions at {rate:,.0f}/s")
    return table


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the loop; returns the summary (also written to ``summary.json``)."""
    started = time.monotonic()
    run_dir = config.workdir / config.scenario
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    # On a shared broker the topics hold other runs' events: a fresh policy name keeps this
    # run's learner to this run's decisions.
    policy = f"{config.scenario}-{uuid.uuid4().hex[:8]}" if config.kafka else config.scenario
    if config.kafka:
        from policyloop.bus.topics import DEFAULT_TOPICS, create_topics

        create_topics(config.kafka, DEFAULT_TOPICS)
    training = train_start_policy(config, run_dir / "registry", policy)
    registry = LocalRegistry(run_dir / "registry")
    scorer = VersionScorer(registry, policy, config)
    scorer.model(1)  # read the start policy now: retention may delete it later
    processes = start_loop(config, run_dir, policy)
    traffic = Traffic()
    drift_index = config.n_events // 2 if config.drift else None
    try:
        asyncio.run(_drive(config, processes.target, policy, run_dir, traffic, scorer,
                           drift_index))
    finally:
        processes.stop()
    if not traffic.versions:
        raise Unavailable(f"no decision succeeded: {traffic.errors}; see {run_dir}/serve.log")
    scores = scorer.final(traffic.versions[-1], drift_index)
    state = learner_state(run_dir)
    published = state.get("published", [])
    summary = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "policy": policy, "traffic": traffic.summary(), "scores": scores,
        "start_training": {k: v for k, v in training.items() if k.startswith("value")},
        "versions_published": len(published),
        "versions_promoted": sum(1 for p in published if p.get("promoted")),
        "learner_examples": state.get("examples", 0),
        "seconds": round(time.monotonic() - started, 1),
    }
    png = config.png or run_dir / "learning_curve.png"
    plot(png, traffic, scores, drift_index, config)
    summary["png"] = str(png)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def demo_command(config: DemoConfig) -> int:
    """``policyloop demo``: run, then print the summary table and where the curve is."""
    from rich.console import Console

    summary = run_demo(config)
    console = Console()
    console.print()
    console.print(summary_table(summary["scores"], summary["traffic"]["decisions"],
                                summary["traffic"]["decisions_per_s"]))
    console.print(f"versions published {summary['versions_published']}, promoted "
                  f"{summary['versions_promoted']}; learning curve: {summary['png']}; "
                  f"whole run {summary['seconds']} s")
    return 0
