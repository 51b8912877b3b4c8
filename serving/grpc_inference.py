"""Open Inference Protocol v2 (``inference.GRPCInferenceService``) over the served models.

Lets any tool of the Triton/KServe ecosystem score a served policy's ONNX model directly:
model name = policy name, version = the version serving now. Scores only; no exploration and
no decision log (that is what ``Decide`` is for).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import grpc
import numpy as np

import policyloop
from policyloop.contract.errors import InvalidArgument, NotFound
from policyloop.registry.onnx_model import LoadedModel
from protos import grpc_inference_pb2 as pb
from protos import grpc_inference_pb2_grpc as pb_grpc
from serving.model_store import ModelStore

_V2_DTYPES = {"float32": "FP32"}
_MAX_ELEMENTS = 16 << 20


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, store: ModelStore, ready: Callable[[], bool]) -> None:
        self._store = store
        self._ready = ready

    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=bool(self._ready()))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="policyloop", version=policyloop.__version__,
                                         extensions=[])

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        try:
            self._model(request.name, request.version)
        except Exception:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        model = self._model(request.name, request.version)
        m = model.manifest
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name, versions=[str(m.version)], platform="onnxruntime_onnx",
            inputs=[tensor(name=t.name, datatype=_V2_DTYPES[t.dtype], shape=t.shape)
                    for t in m.inputs],
            outputs=[tensor(name=t.name, datatype=_V2_DTYPES[t.dtype], shape=t.shape)
                     for t in m.outputs])

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        model = self._model(request.model_name, request.model_version)
        inputs = _decode_inputs(request, model)
        scores, embedding = model.run(inputs["context"], inputs.get("action_features"))
        produced = {"scores": scores, "embedding": embedding}
        for name, output in produced.items():
            if not np.isfinite(output).all():
                raise InvalidArgument(
                    f"the model's {name} output for these inputs has NaN or infinite values "
                    "(inputs far outside the range it was trained on?); Decide refuses them too")
        wanted = [o.name for o in request.outputs] or list(produced)
        unknown = [n for n in wanted if n not in produced]
        if unknown:
            raise InvalidArgument(f"outputs: unknown output {unknown[0]!r}; the model has "
                                  f"{sorted(produced)}")
        response = pb.ModelInferResponse(model_name=request.model_name,
                                         model_version=str(model.version), id=request.id)
        for name in wanted:
            array = np.ascontiguousarray(produced[name], dtype=np.float32)
            response.outputs.add(name=name, datatype="FP32", shape=array.shape)
            response.raw_output_contents.append(array.tobytes())
        return response

    def _model(self, name: str, version: str) -> LoadedModel:
        model = self._store.get(name)
        if version and version != str(model.version):
            raise NotFound(f"model {name!r} version {version!r} is not loaded; serving "
                           f"version {model.version}")
        return model


def _decode_inputs(request: pb.ModelInferRequest, model: LoadedModel) -> dict[str, np.ndarray]:
    """Input tensors as float32 arrays, from raw_input_contents or typed contents."""
    specs = {t.name: t for t in model.manifest.inputs}
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(f"raw_input_contents has {len(raw)} entries for "
                              f"{len(request.inputs)} inputs")
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        spec = specs.get(tensor.name)
        if spec is None:
            raise InvalidArgument(f"inputs[{i}]: unknown input {tensor.name!r}; the model "
                                  f"takes {sorted(specs)}")
        if tensor.datatype != "FP32":
            raise InvalidArgument(f"inputs[{i}] {tensor.name!r}: datatype {tensor.datatype!r},"
                                  " the model takes FP32")
        shape = tuple(int(d) for d in tensor.shape)
        if len(shape) != len(spec.shape) or any(
                d < 0 or (s >= 0 and d != s) for d, s in zip(shape, spec.shape, strict=True)):
            raise InvalidArgument(f"inputs[{i}] {tensor.name!r}: shape {list(shape)} does not "
                                  f"fit {list(spec.shape)}")
        count = math.prod(shape)  # Python ints: a product past int64 cannot wrap around
        if count > _MAX_ELEMENTS:
            raise InvalidArgument(f"inputs[{i}] {tensor.name!r}: {count} elements is too many")
        if raw:
            if len(raw[i]) != 4 * count:
                raise InvalidArgument(f"inputs[{i}] {tensor.name!r}: {len(raw[i])} raw bytes "
                                      f"for shape {list(shape)} (expected {4 * count})")
            array = np.frombuffer(raw[i], dtype="<f4").reshape(shape)
        else:
            values = tensor.contents.fp32_contents
            if len(values) != count:
                raise InvalidArgument(f"inputs[{i}] {tensor.name!r}: {len(values)} fp32 values "
                                      f"for shape {list(shape)}")
            array = np.asarray(values, dtype=np.float32).reshape(shape)
        if not np.isfinite(array).all():
            raise InvalidArgument(f"inputs[{i}] {tensor.name!r} has NaN or infinite values")
        arrays[tensor.name] = array
    missing = set(specs) - set(arrays)
    if missing:
        raise InvalidArgument(f"inputs: missing {sorted(missing)}")
    if "action_features" in arrays and (
            arrays["action_features"].shape[0] != arrays["context"].shape[0]):
        raise InvalidArgument("inputs: context and action_features batch sizes differ")
    return arrays
