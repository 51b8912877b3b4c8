"""Soak: a steady load on one ``policyloop serve`` process for minutes; does memory grow, does
the p99 hold?

The server runs as deployed (its own process, decisions logged to Kafka or the local log); this
script is the app: ``--rate`` Decide calls per second, each followed by its Reward, from
``--clients`` threads. Every 10 s it samples the server's resident memory (/proc) and the
latencies of that window. Reported: RSS after warm-up and at the end (and the slope between),
p50/p99 per window and overall, errors by status.

Usage: python bench/soak_bench.py [--seconds 180] [--rate 300] [--kafka HOST:PORT]
                                  [--out bench/results/soak.json]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WINDOW_S = 10.0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def start_server(work: Path, kafka: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    from policyloop.registry.local import LocalRegistry
    from tests.onnx_models import qnet_model

    LocalRegistry(work / "registry").publish("routing", *qnet_model())
    bus = ["--bus", "kafka", "--kafka", kafka] if kafka else ["--bus-path", str(work / "bus")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "policyloop.cli", "--log-level", "WARNING", "serve",
         "--registry", str(work / "registry"), "--port", "0", "--metrics-port", "0",
         "--spool-dir", str(work / "spool"), "--policy", "routing=epsilon_greedy:0.1", *bus,
         *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "policyloop serve:" not in line:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, line.split("grpc=")[1].split()[0]


def soak(seconds: float, rate: float, clients: int, kafka: str,
         serve_args: list[str] | None = None) -> dict:
    from protos import decision_pb2 as pb
    from protos import decision_pb2_grpc as pb_grpc

    work = Path(tempfile.mkdtemp(prefix="policyloop-soak-"))
    server, target = start_server(work, kafka, serve_args or [])
    latencies: list[tuple[float, float]] = []  # (time since start, seconds)
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    start = time.monotonic()
    end = start + seconds

    def client(k: int) -> None:
        rng = np.random.default_rng(k)
        interval = clients / rate
        next_at = start + k * interval / clients
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.DecisionServiceStub(channel)
            while next_at < end:
                time.sleep(max(0.0, next_at - time.monotonic()))
                context = pb.Features(dense=rng.normal(size=5).astype(np.float32))
                t0 = time.perf_counter()
                try:
                    answer = stub.Decide(pb.DecideRequest(policy="routing", context=context),
                                         timeout=5)
                    took = time.perf_counter() - t0
                    stub.Reward(pb.RewardRequest(event_id=answer.event_id,
                                                 value=float(rng.random() < 0.3)), timeout=5)
                    with lock:
                        latencies.append((time.monotonic() - start, took))
                except grpc.RpcError as exc:
                    with lock:
                        errors[exc.code().name] += 1
                next_at += interval

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    samples = []
    while time.monotonic() < end:
        time.sleep(min(WINDOW_S, max(0.0, end - time.monotonic())))
        samples.append({"t_s": round(time.monotonic() - start, 1), "rss_mib": rss_mib(server.pid)})
    for t in threads:
        t.join(timeout=30)
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=60)

    when = np.array([w for w, _ in latencies])
    took = np.array([d for _, d in latencies]) * 1000
    windows = []
    for lo in np.arange(0.0, seconds, WINDOW_S):
        mask = (when >= lo) & (when < lo + WINDOW_S)
        if mask.any():
            windows.append({"from_s": float(lo), "calls": int(mask.sum()),
                            "p50_ms": round(float(np.percentile(took[mask], 50)), 2),
                            "p99_ms": round(float(np.percentile(took[mask], 99)), 2)})
    warm = [s for s in samples if s["t_s"] >= min(60.0, seconds / 3)]
    slope = (float(np.polyfit([s["t_s"] for s in warm], [s["rss_mib"] for s in warm], 1)[0])
             * 60 if len(warm) >= 2 else 0.0)
    return {
        "seconds": seconds, "rate_per_s": rate, "clients": clients,
        "bus": "kafka" if kafka else "local", "decisions": len(latencies),
        "errors": dict(errors),
        "rss_mib_after_warmup": warm[0]["rss_mib"] if warm else None,
        "rss_mib_end": samples[-1]["rss_mib"] if samples else None,
        "rss_slope_mib_per_min_after_warmup": round(slope, 3),
        "decide_p50_ms": round(float(np.percentile(took, 50)), 2) if len(took) else None,
        "decide_p99_ms": round(float(np.percentile(took, 99)), 2) if len(took) else None,
        "worst_window_p99_ms": max((w["p99_ms"] for w in windows), default=None),
        "windows": windows, "memory": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--rate", type=float, default=300.0, help="Decide calls per second")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--kafka", default="", help="log decisions to this Kafka broker")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for `policyloop serve` (repeatable), e.g. "
                        "--serve-arg=--micro-batch --serve-arg=1")
    args = parser.parse_args()
    result = soak(args.seconds, args.rate, args.clients, args.kafka, args.serve_arg)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("windows", "memory")},
                     indent=2))


if __name__ == "__main__":
    main()
