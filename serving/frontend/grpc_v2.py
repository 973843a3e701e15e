"""KServe V2 over gRPC (inference.GRPCInferenceService) in every front-end, on RNNSERVE_GRPC_PORT:
health, metadata, ModelInfer with raw_input_contents / raw_output_contents, the repository
extension, and ModelStreamInfer: Triton's decoupled streaming of generated text (grpc_stream.py).
It translates to and from the request path REST takes too (serving/frontend/service.py): the same
engines and batches, checks, token (as `authorization` metadata), counts, and errors (as gRPC
status codes: CODES).

The service definition is the published grpc_service.proto as Triton's client ships it compiled
(tritonclient.grpc.service_pb2): what tritonclient.grpc and KServe's clients speak, unchanged.
The front-ends share the port with SO_REUSEPORT, as they share the HTTP one.
"""
import asyncio
import functools
import logging

import grpc
from fastapi import HTTPException
from starlette.datastructures import State
from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc

from serving.common import tracing
from serving.common.logs import start_request
from serving.frontend import grpc_sequence, grpc_stream, service, tensors
from serving.frontend.access import NEEDS_TOKEN, bearer_matches, control_closed, token_of

log = logging.getLogger(__name__)
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND, 410: grpc.StatusCode.NOT_FOUND,
         413: grpc.StatusCode.RESOURCE_EXHAUSTED, 499: grpc.StatusCode.CANCELLED, 503: grpc.StatusCode.UNAVAILABLE,
         504: grpc.StatusCode.DEADLINE_EXCEEDED}  # HTTP status -> gRPC code; anything else INTERNAL
STATUSES = {code: status for status, code in CODES.items() if status != 410} | {grpc.StatusCode.INTERNAL: 500}


def rpc(guard: str | None = None):
    """An RPC as the front door treats a request: an id (x-request-id metadata), the token where
    `guard` ("control", or "inference" with token_for_inference) asks for it, and every refusal
    (HTTPException) as its gRPC status, an unexpected error as INTERNAL with the id to find it by."""
    def wrap(method):
        @functools.wraps(method)
        async def handler(self, request, context: grpc.aio.ServicerContext):
            metadata = dict(context.invocation_metadata() or ())
            request_id = start_request(metadata.get("x-request-id", ""))
            context.set_trailing_metadata((("x-request-id", request_id),))
            try:
                with tracing.server_span(f"inference.GRPCInferenceService/{method.__name__}", metadata, **{
                        "rpc.system": "grpc", "rpc.method": method.__name__, "rnnserve.request_id": request_id}):
                    self.check(guard, metadata.get("authorization", "").encode("latin-1"))
                    return await method(self, request, context)
            except HTTPException as e:
                await context.abort(CODES.get(e.status_code, grpc.StatusCode.INTERNAL), f"{e.detail} (request {request_id})")
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as e:
                error = service.unexpected(e)
                await context.abort(grpc.StatusCode.INTERNAL, f"{error.detail} (request {request_id})")
        return handler
    return wrap


def inputs_of(request: pb.ModelInferRequest) -> list[tensors.Input]:
    """The inputs' raw_input_contents (one per input, in order) or, without them, their contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise HTTPException(400, f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    return [tensors.Input(t.name, t.datatype, list(t.shape),
                          tensors.from_bytes(t.name, t.datatype, list(t.shape), raw[i]) if raw else list(t.contents.int64_contents))
            for i, t in enumerate(request.inputs)]


class Service(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: State):
        self.state, self.settings = state, state.settings
        self.token = token_of(self.settings)

    def check(self, guard: str | None, authorization: bytes):
        if guard == "control" and (closed := control_closed(self.settings)):
            raise HTTPException(403, closed)
        guarded = guard == "control" or (guard == "inference" and self.settings.token_for_inference)
        if self.token and guarded and not bearer_matches(self.token, authorization):
            raise HTTPException(401, NEEDS_TOKEN)

    @rpc()
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @rpc()
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=service.ready(self.state))

    @rpc()
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(**service.SERVER)

    @rpc("inference")
    async def ModelReady(self, request, context):
        try:
            service.served(self.state, request.name, request.version or None)
        except HTTPException:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @rpc("inference")
    async def ModelMetadata(self, request, context):
        meta = service.v2_metadata(self.state, request.name, request.version or None)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=[tensor(**t) for t in meta["inputs"]],
                                        outputs=[tensor(**t) for t in meta["outputs"]])

    @rpc("inference")
    async def ModelInfer(self, request, context):
        """Logits for right-padded input_ids and lengths, batched with every other request."""
        client = getattr(self.state, "engines", None)
        with service.counted(client, request.model_name, "grpc_infer") as outcome:
            try:
                response = await self.infer(request, context.time_remaining())
                outcome.status = 200
                return response
            except HTTPException as e:
                outcome.status = STATUSES[CODES.get(e.status_code, grpc.StatusCode.INTERNAL)]
                raise
            except asyncio.CancelledError:
                outcome.status = STATUSES[grpc.StatusCode.CANCELLED]
                raise

    async def infer(self, request: pb.ModelInferRequest, timeout_s: float | None = None) -> pb.ModelInferResponse:
        """A ModelInfer request's answer (also one on the stream); a refusal raises its HTTPException."""
        name = request.model_name
        service.stateless(grpc_sequence.sequence_id(request))
        if full := service.shed(service.engines(self.state), name):
            raise full
        version, logits = await service.infer_tensors(self.state, name, inputs_of(request), [o.name for o in request.outputs],
                                                      request.model_version or None, timeout_s=timeout_s)
        return pb.ModelInferResponse(
            model_name=name, model_version=str(version.number), id=request.id,
            outputs=[pb.ModelInferResponse.InferOutputTensor(name="logits", datatype="FP32", shape=logits.shape)],
            raw_output_contents=[logits.astype("<f4", copy=False).tobytes()])

    async def ModelStreamInfer(self, requests, context):
        """Triton's decoupled streaming: generation's text as it comes (serving/frontend/grpc_stream.py).
        The token, when inference needs one, is checked once for the stream."""
        metadata = dict(context.invocation_metadata() or ())
        request_id = start_request(metadata.get("x-request-id", ""))
        context.set_trailing_metadata((("x-request-id", request_id),))
        try:
            self.check("inference", metadata.get("authorization", "").encode("latin-1"))
        except HTTPException as e:
            await context.abort(CODES[e.status_code], f"{e.detail} (request {request_id})")
        with tracing.server_span("inference.GRPCInferenceService/ModelStreamInfer", metadata, **{
                "rpc.system": "grpc", "rpc.method": "ModelStreamInfer", "rnnserve.request_id": request_id}):
            async for response in grpc_stream.serve(self.state, requests, self.infer):
                yield response

    @rpc("control")
    async def RepositoryIndex(self, request, context):
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[index(**row) for row in await service.index(self.state, request.ready)])

    @rpc("control")
    async def RepositoryModelLoad(self, request, context):
        """parameters["version"] (int64_param or string_param) loads and pins that version."""
        version = None
        if "version" in request.parameters:
            param = request.parameters["version"]
            version = getattr(param, param.WhichOneof("parameter_choice") or "string_param")
        await service.load(self.state, request.model_name, version)
        return pb.RepositoryModelLoadResponse()

    @rpc("control")
    async def RepositoryModelUnload(self, request, context):
        await service.unload(self.state, request.model_name)
        return pb.RepositoryModelUnloadResponse()


async def unimplemented(self, request, context):
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this extension of the protocol is not served by rnnserve")


for _name in set(vars(service_pb2_grpc.GRPCInferenceServiceServicer)) - set(vars(Service)):  # statistics,
    if not _name.startswith("_"):  # shared memory, trace and log settings
        setattr(Service, _name, unimplemented)


async def start(state: State) -> grpc.aio.Server:
    """This front-end's gRPC server on settings.grpc_port: messages up to max_body_bytes, calls up to
    grpc_max_concurrent_rpcs, and its connections kept as the grpc_* settings say (docs/api.md)."""
    settings = state.settings
    server = grpc.aio.server(maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs, options=[
        ("grpc.so_reuseport", 1),
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.keepalive_time_ms", settings.grpc_keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.grpc_keepalive_timeout_ms),
        # ... and as the ping timeout, without which grpcio 1.85 drops a peer that leaves a keepalive ping
        # unanswered only after a minute (measured: tests/test_grpc.py)
        ("grpc.http2.ping_timeout_ms", settings.grpc_keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),  # pings on idle connections: ours, and clients' as below
        ("grpc.http2.min_ping_interval_without_data_ms", settings.grpc_min_client_ping_interval_ms),
        ("grpc.max_connection_age_ms", settings.grpc_max_connection_age_ms),
        ("grpc.max_connection_age_grace_ms", settings.grpc_max_connection_age_grace_ms)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Service(state), server)
    address = f"{settings.host}:{settings.grpc_port}"
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"gRPC could not listen on {address}")
    await server.start()
    log.info("gRPC (KServe V2) on %s", address)
    return server
