"""The Open Inference Protocol over gRPC (KServe's ``GRPCInferenceService``), beside the
HTTP API and on the same batcher: its messages (``proto/``), codec, servicer, authentication
and the server's lifecycle in the app."""

__all__: list[str] = []
