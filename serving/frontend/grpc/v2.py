"""KServe V2 over gRPC (inference.GRPCInferenceService) in every front-end, on RNNSERVE_GRPC_PORT:
health, metadata, ModelInfer with raw_input_contents / raw_output_contents, the repository,
model configuration and statistics extensions, and ModelStreamInfer: Triton's decoupled streaming of generated text (stream.py).
It translates to and from the front-end's core (serving/frontend/core/), as REST does: the same
envelope (id, token as `authorization` metadata, span, count), engines and batches, checks, and
errors (as gRPC status codes: status.py).

The service definition is the published grpc_service.proto as Triton's client ships it compiled
(tritonclient.grpc.service_pb2): what tritonclient.grpc and KServe's clients speak, unchanged.
The front-ends share the port with SO_REUSEPORT, as they share the HTTP one.
"""
import functools
import logging
from contextlib import contextmanager

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2 as pb, service_pb2_grpc

from serving.common.logs import REQUEST_ID
from serving.frontend.core import control, front as fronts, inference, metadata, statistics, tensors
from serving.frontend.core.envelope import begun, entered, shed
from serving.frontend.core.front import SERVER, Front
from serving.frontend.core.refused import Refused
from serving.frontend.grpc import inputs, sequence, status, stream

log = logging.getLogger(__name__)
SERVICE = "inference.GRPCInferenceService"


def rpc(guard: str | None = None, endpoint: str = ""):
    """An RPC in the request envelope (Service.entered): its refusal as its gRPC status, with the
    request id to find it by. endpoint: its name in /metrics (counted, under its request's model)."""
    def wrap(method):
        @functools.wraps(method)
        async def handler(self, request, context: grpc.aio.ServicerContext):
            try:
                with self.entered(context, method.__name__, guard, getattr(request, "model_name", ""),
                                  endpoint) as outcome:
                    inputs.within(request, self.settings.max_body_bytes)
                    response = await method(self, request, context)
                    outcome.status = 200
                    return response
            except Refused as e:
                await self.abort(context, e)
        return handler
    return wrap


def inputs_of(request: pb.ModelInferRequest) -> list[tensors.Input]:
    """The inputs' raw_input_contents (one per input, in order) or, without them, their contents
    (int64_contents, or a BYTES input's bytes_contents)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise Refused(400, f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    return [tensors.Input(t.name, t.datatype, list(t.shape),
                          tensors.from_bytes(t.name, t.datatype, list(t.shape), raw[i]) if raw else
                          list(t.contents.bytes_contents if t.datatype == "BYTES" else t.contents.int64_contents))
            for i, t in enumerate(request.inputs)]


class Service(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, front: Front):
        self.front, self.settings = front, front.settings

    @contextmanager
    def entered(self, context: grpc.aio.ServicerContext, method: str, guard: str | None = None, model: str = "",
                endpoint: str = ""):
        """The core's envelope for a call: its id from x-request-id metadata (and in the trailing
        metadata of its answer), its token from `authorization`, counted with the status its code
        stands for."""
        given = dict(context.invocation_metadata() or ())
        outcome = begun(given.get("x-request-id", ""), endpoint)
        context.set_trailing_metadata((("x-request-id", outcome.request_id),))
        with entered(self.front, outcome, f"{SERVICE}/{method}", given, given.get("authorization", "").encode("latin-1"),
                     guard, model, counted_as=status.counted, **{"rpc.system": "grpc", "rpc.method": method}):
            yield outcome

    @staticmethod
    async def abort(context: grpc.aio.ServicerContext, e: Refused):
        """A refusal as the call's status: its code, and its message with the request id."""
        await context.abort(status.code(e.status), f"{e.message} (request {REQUEST_ID.get()})")

    @rpc()
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @rpc()
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=fronts.ready(self.front))

    @rpc()
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(**SERVER)

    @rpc("inference")
    async def ModelReady(self, request, context):
        """ready: false (and why, in the log) for a model or version not served, as Triton answers."""
        return pb.ModelReadyResponse(ready=fronts.unready(self.front, request.name, request.version or None) is None)

    @rpc("inference")
    async def ModelMetadata(self, request, context):
        meta = metadata.v2_metadata(self.front, request.name, request.version or None)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=[tensor(**t) for t in meta["inputs"]],
                                        outputs=[tensor(**t) for t in meta["outputs"]])

    @rpc("inference")
    async def ModelConfig(self, request, context):
        """The model's configuration: the core's JSON form read into Triton's ModelConfig message."""
        config = metadata.model_config(self.front, request.name, request.version or None)
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, model_config_pb2.ModelConfig()))

    @rpc("inference")
    async def ModelStatistics(self, request, context):
        """Every model version's statistics, or those of request.name (and version)."""
        stats = await statistics.statistics(self.front, request.name, request.version or None)
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse())

    @rpc("inference", "grpc_infer")
    async def ModelInfer(self, request, context):
        """Logits for right-padded input_ids and lengths, or a classifier's text_input, batched with
        every other request."""
        return await self.infer(request, context.time_remaining())

    async def infer(self, request: pb.ModelInferRequest, timeout_s: float | None = None) -> pb.ModelInferResponse:
        """A ModelInfer request's answer (also one on the stream); a refusal raises its Refused."""
        name = request.model_name
        fronts.stateless(sequence.sequence_id(request))
        shed(fronts.engines(self.front), name)
        version, outputs = await inference.infer_tensors(self.front, name, inputs_of(request),
                                                         [o.name for o in request.outputs],
                                                         request.model_version or None, timeout_s=timeout_s)
        tensor = pb.ModelInferResponse.InferOutputTensor
        return pb.ModelInferResponse(
            model_name=name, model_version=str(version.number), id=request.id,
            outputs=[tensor(name=o.name, datatype=o.datatype, shape=o.shape) for o in outputs],
            raw_output_contents=[o.raw() for o in outputs])

    async def ModelStreamInfer(self, requests, context):
        """Triton's decoupled streaming: generation's text as it comes (stream.py), in one envelope
        for the stream (its token checked once); each request on it is counted as it is answered."""
        try:
            with self.entered(context, "ModelStreamInfer", "inference") as outcome:
                async for response in stream.serve(self.front, requests, self.infer, outcome.request_id):
                    yield response
                outcome.status = 200
        except Refused as e:
            await self.abort(context, e)

    @rpc("control")
    async def RepositoryIndex(self, request, context):
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[index(**row) for row in await control.index(self.front, request.ready)])

    @rpc("control")
    async def RepositoryModelLoad(self, request, context):
        """parameters["version"] (int64_param or string_param) loads and pins that version."""
        version = None
        if "version" in request.parameters:
            param = request.parameters["version"]
            version = getattr(param, param.WhichOneof("parameter_choice") or "string_param")
        await control.load(self.front, request.model_name, version)
        return pb.RepositoryModelLoadResponse()

    @rpc("control")
    async def RepositoryModelUnload(self, request, context):
        await control.unload(self.front, request.model_name)
        return pb.RepositoryModelUnloadResponse()


async def unimplemented(self, request, context):
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this extension of the protocol is not served by rnnserve")


for _name in set(vars(service_pb2_grpc.GRPCInferenceServiceServicer)) - set(vars(Service)):  # shared memory,
    if not _name.startswith("_"):  # trace and log settings
        setattr(Service, _name, unimplemented)


async def start(front: Front) -> grpc.aio.Server:
    """This front-end's gRPC server on settings.grpc_port: messages up to max_body_bytes (inputs.within), calls up to
    grpc_max_concurrent_rpcs, and its connections kept as the grpc_* settings say (docs/api.md)."""
    settings = front.settings
    server = grpc.aio.server(maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs, options=[
        ("grpc.so_reuseport", 1),
        ("grpc.max_receive_message_length", settings.max_body_bytes * inputs.READ_FACTOR),  # within() refuses past 1x
        ("grpc.keepalive_time_ms", settings.grpc_keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.grpc_keepalive_timeout_ms),
        # ... and as the ping timeout, without which grpcio 1.85 drops a peer that leaves a keepalive ping
        # unanswered only after a minute (measured: tests/test_grpc.py)
        ("grpc.http2.ping_timeout_ms", settings.grpc_keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),  # pings on idle connections: ours, and clients' as below
        ("grpc.http2.min_ping_interval_without_data_ms", settings.grpc_min_client_ping_interval_ms),
        ("grpc.max_connection_age_ms", settings.grpc_max_connection_age_ms),
        ("grpc.max_connection_age_grace_ms", settings.grpc_max_connection_age_grace_ms)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Service(front), server)
    address = f"{settings.host}:{settings.grpc_port}"
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"gRPC could not listen on {address}")
    await server.start()
    log.info("gRPC (KServe V2) on %s", address)
    return server
