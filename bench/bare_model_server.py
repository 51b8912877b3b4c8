"""The benchmark's second reference: a bare grpc.aio server that only scores and answers.

It parses the request, reads the candidate features the way ``policyloop serve`` does
(``serving.grpc_decision.dense_rows``), runs the model once per call with the server's
onnxruntime settings and returns a greedy answer: no validation, exploration, decision log,
metrics or batching. No server that runs the model once per call can be faster than this one,
so the gap from this row to ``decide`` is the cost of everything else ``Decide`` does.

With ``--no-model`` the model run is replaced by fixed scores (the rest is unchanged), so the gap
from the floor to that row is the cost of reading the request and building the answer, and the
gap between the two rows is the model run's cost inside a loaded grpc.aio process.
Usage: python bench/bare_model_server.py REGISTRY POLICY [--port N] [--no-model]
(prints "port=N" once listening)
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
import numpy as np
import onnxruntime as ort

from policyloop.registry.local import LocalRegistry
from policyloop.registry.onnx_model import session_options
from protos import decision_pb2 as pb
from protos import decision_pb2_grpc as pb_grpc
from serving.grpc_decision import dense_rows


class BareModelServicer(pb_grpc.DecisionServiceServicer):
    def __init__(self, session: ort.InferenceSession | None, version: int) -> None:
        """``session`` None: score with fixed scores instead of the model."""
        self._session = session
        self._version = version

    async def Decide(self, request: pb.DecideRequest,
                     context: grpc.aio.ServicerContext) -> pb.DecideResponse:
        ids = [c.id for c in request.candidates]
        items = dense_rows([c.features for c in request.candidates])
        if items is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "candidates must all hold dense features of one length")
        user = np.asarray(request.context.dense, dtype=np.float32)[None]
        if self._session is None:
            scores = np.arange(len(ids), 0, -1, dtype=np.float32)[None]
        else:
            (scores,) = self._session.run(["scores"], {"context": user,
                                                       "action_features": items[None]})
        order = np.argsort(-scores[0])
        best = int(order[0])
        return pb.DecideResponse(
            event_id="bare", policy=request.policy, strategy="greedy",
            model_version=self._version,
            chosen=[pb.SlotDecision(action_id=ids[best], candidate_index=best, propensity=1.0)],
            ranking=[ids[int(i)] for i in order], active=True)


async def main(registry: str, policy: str, port: int, no_model: bool) -> None:
    version = LocalRegistry(registry).current(policy)
    session = None if no_model else ort.InferenceSession(
        version.read_model(), sess_options=session_options(1),
        providers=["CPUExecutionProvider"])
    server = grpc.aio.server()
    pb_grpc.add_DecisionServiceServicer_to_server(
        BareModelServicer(session, version.manifest.version), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"port={bound}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("registry", help="local registry folder")
    parser.add_argument("policy", help="policy whose current version is scored")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--no-model", action="store_true",
                        help="fixed scores instead of the model run")
    args = parser.parse_args()
    asyncio.run(main(args.registry, args.policy, args.port, args.no_model))
