"""grpc.health.v1 and server reflection on the shared server (tools like grpcurl rely on both)."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2


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


# grpcurl and most tools try v1 first, older clients only know v1alpha: both must answer alike.
REFLECTION_PATHS = (
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
)
SERVED = {
    "glm.v1.GlmService",
    "glm.v1.HttpGatewayService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
}


async def reflect(
    channel: grpc.aio.Channel, path: str, *requests: reflection_pb2.ServerReflectionRequest
) -> list[reflection_pb2.ServerReflectionResponse]:
    """One reflection stream on `path` (v1 and v1alpha messages are the same on the wire)."""
    call = channel.stream_stream(
        path,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return [r async for r in call(iter(requests))]


def file_with_package(
    response: reflection_pb2.ServerReflectionResponse, package: str
) -> descriptor_pb2.FileDescriptorProto:
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]
    return next(f for f in files if f.package == package)


@pytest.mark.parametrize("path", REFLECTION_PATHS)
async def test_reflection_lists_and_describes_every_service(
    channel: grpc.aio.Channel, path: str
) -> None:
    symbols = sorted(SERVED)
    responses = await reflect(
        channel,
        path,
        reflection_pb2.ServerReflectionRequest(list_services=""),
        *(reflection_pb2.ServerReflectionRequest(file_containing_symbol=s) for s in symbols),
    )
    assert {s.name for s in responses[0].list_services_response.service} == SERVED
    for symbol, response in zip(symbols, responses[1:], strict=True):
        assert not response.HasField("error_response"), (symbol, response.error_response)
        package, name = symbol.rsplit(".", 1)
        [service] = file_with_package(response, package).service
        assert service.name == name
    glm = file_with_package(responses[1 + symbols.index("glm.v1.GlmService")], "glm.v1")
    [service] = glm.service
    assert [m.name for m in service.method] == ["Chat", "Embed", "Tokenize", "ListModels"]
    assert service.method[0].server_streaming


async def test_reflection_v1_describes_itself_with_v1_types(channel: grpc.aio.Channel) -> None:
    [response] = await reflect(
        channel,
        REFLECTION_PATHS[0],
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="grpc.reflection.v1.ServerReflection"
        ),
    )
    v1 = file_with_package(response, "grpc.reflection.v1")
    [method] = v1.service[0].method
    assert method.input_type == ".grpc.reflection.v1.ServerReflectionRequest"
    assert method.output_type == ".grpc.reflection.v1.ServerReflectionResponse"
    assert {m.name for m in v1.message_type} >= {"ServerReflectionRequest", "ListServiceResponse"}


async def test_reflection_of_an_unknown_symbol_is_not_found(channel: grpc.aio.Channel) -> None:
    [response] = await reflect(
        channel,
        REFLECTION_PATHS[0],
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="nope.Service"),
    )
    assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
