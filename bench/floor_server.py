"""The benchmark's floor: a bare grpc.aio server answering ``Decide`` with a fixed response.

Same service, same method, same request bytes as the real server, no work: whatever the real
server's throughput falls short of this one is the cost of deciding and logging.
Usage: python bench/floor_server.py [PORT]   (prints "port=N" once listening)
"""

from __future__ import annotations

import asyncio
import sys

import grpc

from protos import decision_pb2 as pb
from protos import decision_pb2_grpc as pb_grpc

_FIXED = pb.DecideResponse(
    event_id="fixed", policy="recsys", strategy="epsilon_greedy(epsilon=0.1)", model_version=1,
    chosen=[pb.SlotDecision(action_id="item-0", candidate_index=0, propensity=0.955)],
    ranking=[f"item-{i}" for i in range(20)], active=True)


class FloorServicer(pb_grpc.DecisionServiceServicer):
    async def Decide(self, request: pb.DecideRequest,
                     context: grpc.aio.ServicerContext) -> pb.DecideResponse:
        return _FIXED


async def main(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_DecisionServiceServicer_to_server(FloorServicer(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"port={bound}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
