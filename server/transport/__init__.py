"""The transport layer: the grpc.aio server, its interceptors, health and reflection."""
