"""The front-end's one request path, whatever the transport (Triton's core behind its HTTP and
gRPC front-ends): the request envelope, readiness and the engine that serves a model, inference,
V2 tensors, metadata, model control, generation, sessions and sequences. It imports no web
framework and no gRPC: REST (serving/frontend/routes/) and gRPC (serving/frontend/grpc/) are
adapters over it, and a refusal is a Refused (refused.py) that each of them translates once.
"""
