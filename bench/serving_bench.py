"""Serving benchmark: the bare grpc.aio floor vs ``Decide``, side by side in one run.

Load comes from ``ghz`` (go install github.com/bojand/ghz/cmd/ghz@v0.121.0), a load generator
none of us wrote, against servers started as separate processes on this machine:

1. the floor: ``bench/floor_server.py``, a bare grpc.aio server returning a fixed response;
2. the bare model server: ``bench/bare_model_server.py``, which only runs the policy's ONNX
   model once per call and answers the best candidate (no server that runs the model once per
   call can be faster), and the same server with fixed scores instead of the model run;
3. ``policyloop serve`` (its defaults, so micro-batching on) with a 64-feature (context) x
   64-feature (item), 20-candidate policy, epsilon-greedy exploration and decision logging to
   the local durable log.

Reported: throughput and p50/p99 latency at concurrency 1, 8 and 32 for both, ``DecideBatch``
rows/s, the same model scored through the v2 ``ModelInfer`` path, and ``Decide`` again on
servers with micro-batching off (``--micro-batch 1``) and with the decision log written by a
child process (``--log-writer process``).

Usage: python bench/serving_bench.py [--duration 8] [--out bench/results/serving.json]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONTEXT_DIM, ITEM_DIM, CANDIDATES = 64, 64, 20
# Decide again on servers with other settings: results key -> extra `serve` flags.
VARIANTS = {
    "decide_unbatched": ["--micro-batch", "1"],
    "decide_log_process": ["--log-writer", "process"],
}
LABELS = {"bare_no_model": "bare server, no model", "bare_model": "bare model server",
          "decide_unbatched": "decide, micro-batching off",
          "decide_log_process": "decide, log writer process"}


def ghz_binary() -> str:
    found = shutil.which("ghz") or str(Path.home() / "go" / "bin" / "ghz")
    if not Path(found).exists():
        sys.exit("ghz not found: go install github.com/bojand/ghz/cmd/ghz@v0.121.0")
    return found


def proto_include() -> str:
    import grpc_tools

    return str(Path(grpc_tools.__file__).parent / "_proto")


def build_registry(root: Path) -> None:
    """Export and register a recsys ScoringNetwork of the benchmark's size (64 context and 64
    item features, the default hidden sizes). Its weights do not matter for speed."""
    import torch

    from models.export import export_and_register
    from models.policies import ScoringNetwork
    from policyloop.registry.local import LocalRegistry
    from policyloop.simulators.recsys import RecsysEnv

    torch.manual_seed(0)
    env = RecsysEnv(context_dim=CONTEXT_DIM, item_dim=ITEM_DIM, n_items=200)
    export_and_register(ScoringNetwork(CONTEXT_DIM, ITEM_DIM), env, LocalRegistry(root),
                        policy="recsys", training={"note": "untrained, for the benchmark"})


def decide_request(rng: np.random.Generator) -> dict:
    return {
        "policy": "recsys",
        "context": {"dense": rng.standard_normal(CONTEXT_DIM).round(4).tolist()},
        "candidates": [{"id": f"item-{i}",
                        "features": {"dense": rng.standard_normal(ITEM_DIM).round(4).tolist()}}
                       for i in range(CANDIDATES)],
    }


def infer_request(rng: np.random.Generator, batch: int = 1) -> dict:
    context = rng.standard_normal((batch, CONTEXT_DIM)).astype("<f4")
    items = rng.standard_normal((batch, CANDIDATES, ITEM_DIM)).astype("<f4")
    return {
        "model_name": "recsys",
        "inputs": [{"name": "context", "datatype": "FP32", "shape": list(context.shape)},
                   {"name": "action_features", "datatype": "FP32", "shape": list(items.shape)}],
        "outputs": [{"name": "scores"}],
        "raw_input_contents": [base64.b64encode(context.tobytes()).decode(),
                               base64.b64encode(items.tobytes()).decode()],
    }


def start(cmd: list[str], marker: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start a server process and return it with the first stdout line containing marker."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline() if proc.stdout else ""
        if marker in line:
            return proc, line.strip()
        if proc.poll() is not None:
            break
    proc.kill()
    sys.exit(f"server did not start: {cmd}")


def ghz(target: str, call: str, data: dict, concurrency: int, duration: float,
        proto: str) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(data, f)
    cmd = [ghz_binary(), "--insecure", "--proto", proto, "--import-paths",
           f"{proto_include()},{ROOT}", "--call", call, "-D", f.name,
           "-c", str(concurrency), "-z", f"{duration}s", "--connections", "1",
           "--format", "json", target]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)
    report = json.loads(out)
    latency = {d["percentage"]: d["latency"] / 1e6 for d in report["latencyDistribution"]}
    codes = report.get("statusCodeDistribution", {})
    return {"concurrency": concurrency, "rps": report["rps"], "p50_ms": latency[50],
            "p99_ms": latency[99], "ok": codes.get("OK", 0),
            "errors": sum(v for k, v in codes.items() if k != "OK"),
            "error_messages": report.get("errorDistribution", {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per ghz run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="policyloop-bench-"))
    build_registry(work / "registry")
    decide = decide_request(rng)
    results: dict = {"machine": {"cores": os.cpu_count()}, "floor": [], "bare_no_model": [],
                     "bare_model": [], "decide": [],
                     "decide_batch": [], "model_infer": [], **{name: [] for name in VARIANTS}}
    proto = "protos/decision.proto"

    def sweep(name: str, target: str) -> None:
        """Decide at concurrency 1, 8 and 32 into results[name]."""
        for c in (1, 8, 32):
            results[name].append(ghz(target, "policyloop.v1.DecisionService.Decide", decide,
                                     c, args.duration, proto))
            print(name, results[name][-1], flush=True)

    references = {"floor": ["bench/floor_server.py", "0"],
                  "bare_no_model": ["bench/bare_model_server.py", str(work / "registry"),
                                    "recsys", "--no-model"],
                  "bare_model": ["bench/bare_model_server.py", str(work / "registry"),
                                 "recsys"]}
    for name, script in references.items():
        reference, line = start([sys.executable, *script], "port=")
        try:
            sweep(name, f"127.0.0.1:{line.split('=')[1]}")
        finally:
            reference.terminate()
            reference.wait()

    def serve(*extra: str) -> tuple[subprocess.Popen, str]:
        server, line = start([sys.executable, "-m", "policyloop.cli", "--log-level", "WARNING",
                              "serve", "--registry", str(work / "registry"), "--port", "0",
                              "--metrics-port", "0", "--bus", "local", "--bus-path",
                              str(work / "bus"), "--spool-dir", str(work / "spool"),
                              "--policy", "recsys=epsilon_greedy:0.1", *extra],
                             "policyloop serve:")
        return server, line.split("grpc=")[1].split()[0]

    server, target = serve()
    try:
        sweep("decide", target)
        batch = {"requests": [decide_request(rng) for _ in range(64)]}
        row = ghz(target, "policyloop.v1.DecisionService.DecideBatch", batch, 8,
                  args.duration, proto)
        row["rows_per_s"] = row["rps"] * 64
        results["decide_batch"].append(row)
        print("decide_batch", row, flush=True)
        for c in (1, 8):
            results["model_infer"].append(ghz(
                target, "inference.GRPCInferenceService.ModelInfer", infer_request(rng), c,
                args.duration, "protos/grpc_inference.proto"))
            print("model_infer", results["model_infer"][-1], flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)

    for name, extra in VARIANTS.items():
        server, target = serve(*extra)
        try:
            sweep(name, target)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
    shutil.rmtree(work, ignore_errors=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = ["| path | concurrency | req/s | p50 ms | p99 ms | vs floor |",
             "| --- | --- | --- | --- | --- | --- |"]
    floor = {r["concurrency"]: r["rps"] for r in results["floor"]}
    for name in ("floor", "bare_no_model", "bare_model", "decide", *VARIANTS, "model_infer"):
        for r in results.get(name, []):
            ratio = f"{r['rps'] / floor[r['concurrency']]:.0%}" if name != "floor" else "-"
            label = LABELS.get(name, name)
            lines.append(f"| {label} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} | {ratio} |")
    for r in results["decide_batch"]:
        lines.append(f"| decide_batch (64 rows) | {r['concurrency']} | {r['rps']:.0f} "
                     f"({r['rows_per_s']:.0f} rows/s) | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
                     "| - |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
