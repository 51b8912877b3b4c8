"""Model outputs that are not numbers, and shapes that overflow (issue #16, finding 8):
ModelInfer and Decide refuse both with INVALID_ARGUMENT, never INTERNAL and never an OK answer
carrying NaN."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from protos import decision_pb2 as pb
from protos import decision_pb2_grpc as pb_grpc
from protos import grpc_inference_pb2 as v2
from protos import grpc_inference_pb2_grpc as v2_grpc
from tests.onnx_models import qnet_model
from tests.server_harness import ServerThread, channel, make_registry, serve_config

HUGE = float(np.finfo(np.float32).max)  # finite, but a weighted sum of it is not


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("outputs")
    registry = make_registry(tmp / "registry")
    registry.publish("routing", *qnet_model(activation="Identity"))  # unbounded scores
    running = ServerThread(serve_config(tmp))
    yield running.target
    running.stop()


def infer(target: str, context: np.ndarray, shape: list[int] | None = None
          ) -> v2.ModelInferResponse:
    request = v2.ModelInferRequest(model_name="routing")
    request.inputs.add(name="context", datatype="FP32",
                       shape=shape if shape is not None else list(context.shape))
    request.raw_input_contents.append(context.astype("<f4").tobytes())
    with channel(target) as ch:
        return v2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request, timeout=5)


def refused(call, *args) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    return info.value.details() or ""


def test_model_infer_answers_finite_inputs_in_range(target: str) -> None:
    response = infer(target, np.full((1, 5), 0.5, np.float32))
    scores = np.frombuffer(response.raw_output_contents[0], "<f4")
    assert np.isfinite(scores).all() and scores.size > 0


def test_model_infer_refuses_outputs_that_are_not_finite(target: str) -> None:
    details = refused(infer, target, np.full((1, 5), HUGE, np.float32))
    assert "NaN or infinite" in details and "output" in details


def test_decide_refuses_scores_that_are_not_finite(target: str) -> None:
    request = pb.DecideRequest(policy="routing", context=pb.Features(dense=[HUGE] * 5))
    with channel(target) as ch:
        details = refused(pb_grpc.DecisionServiceStub(ch).Decide, request)
    assert "NaN or infinite" in details


@pytest.mark.parametrize("shape", [[2**32, 2**32, 5], [2**62, 4, 5]])
def test_a_shape_whose_element_count_overflows_is_invalid_argument(target: str,
                                                                   shape: list[int]) -> None:
    details = refused(infer, target, np.zeros((1, 5), np.float32), shape)
    assert "does not fit" in details or "too many" in details
