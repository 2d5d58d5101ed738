"""glm-api server: a grpc.aio service over chat and embedding models.

Data flows one way: transport (gRPC server, interceptors, health) -> service (proto <-> domain)
-> engine (scheduling, batching, generation loop) -> models (torch / transformers).
"""
