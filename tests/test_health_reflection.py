"""grpc.health.v1 and server reflection on the shared server (tools like grpcurl rely on both)."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


async def test_health_per_service(health_stub: health_pb2_grpc.HealthStub) -> None:
    for service in ("", "glm.v1.GlmService"):
        response = await health_stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_of_an_unknown_service_is_not_found(
    health_stub: health_pb2_grpc.HealthStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await health_stub.Check(health_pb2.HealthCheckRequest(service="nope.Service"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_and_describes_the_services(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="glm.v1.GlmService"),
    ]
    responses = [r async for r in stub.ServerReflectionInfo(iter(requests))]
    services = {s.name for s in responses[0].list_services_response.service}
    assert {"glm.v1.GlmService", "grpc.health.v1.Health"} <= services
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in responses[1].file_descriptor_response.file_descriptor_proto
    ]
    glm_file = next(f for f in files if f.package == "glm.v1")
    [service] = glm_file.service
    assert [m.name for m in service.method] == ["Chat", "Embed", "Tokenize", "ListModels"]
    assert service.method[0].server_streaming
