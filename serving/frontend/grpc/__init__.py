"""KServe V2 over gRPC (inference.GRPCInferenceService), an adapter over the front-end's core
(serving/frontend/core/) beside REST's routes: v2.py serves the methods, each in the core's
request envelope; stream.py Triton's decoupled streaming; sequence.py Triton's sequences on it;
inputs.py the LLM inputs those take; status.py the one table from the core's statuses to gRPC's.
"""
