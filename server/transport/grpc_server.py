"""Builds the grpc.aio server: GlmService, health, reflection, the error and auth interceptors."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from glm.v1 import glm_service_pb2 as pb
from glm.v1 import glm_service_pb2_grpc as pb_grpc
from glm.v1 import http_gateway_pb2 as gw
from glm.v1 import http_gateway_pb2_grpc as gw_grpc
from server.memory import MemoryReleaser
from server.metrics import Metrics
from server.transport.auth import AuthInterceptor
from server.transport.errors import ErrorInterceptor
from server.transport.reflection import enable_reflection

GLM_SERVICE = pb.DESCRIPTOR.services_by_name["GlmService"].full_name
GATEWAY_SERVICE = gw.DESCRIPTOR.services_by_name["HttpGatewayService"].full_name
# Health is reported for the server as a whole ("") and for each service it hosts.
HEALTH_SERVICES = ("", GLM_SERVICE, GATEWAY_SERVICE)


class Health:
    """grpc.health.v1 statuses: NOT_SERVING until ready, SERVING, NOT_SERVING while draining."""

    def __init__(self) -> None:
        self.servicer = HealthServicer()

    async def set_serving(self, serving: bool) -> None:
        """Report every service as SERVING or NOT_SERVING."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in HEALTH_SERVICES:
            await self.servicer.set(name, status)

    async def drain(self) -> None:
        """Report NOT_SERVING for good: the server is shutting down."""
        await self.servicer.enter_graceful_shutdown()


def build_server(
    servicer: pb_grpc.GlmServiceServicer,
    health: Health,
    *,
    max_message_bytes: int,
    gateway: gw_grpc.HttpGatewayServiceServicer | None = None,
    metrics: Metrics | None = None,
    memory: MemoryReleaser | None = None,
    auth: AuthInterceptor | None = None,
    reflection: bool = True,
) -> grpc.aio.Server:
    """A server with every service registered and no port bound yet.

    With `metrics`, every glm.* call is counted and timed in it; with `memory`, large calls are
    followed by giving freed memory back (see server/transport/errors.py). With `auth`, every
    glm.* call needs an API key (server/transport/auth.py); it runs inside the error
    interceptor, so refused calls are logged and counted like the others.
    """
    interceptors: list[grpc.aio.ServerInterceptor[Any, Any]] = [ErrorInterceptor(metrics, memory)]
    if auth is not None:
        interceptors.append(auth)
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Fail loudly when the port is taken instead of sharing it with another process.
            ("grpc.so_reuseport", 0),
        ],
    )
    # The generated registration function carries no annotations.
    pb_grpc.add_GlmServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    served = [GLM_SERVICE]
    if gateway is not None:
        gw_grpc.add_HttpGatewayServiceServicer_to_server(gateway, server)  # type: ignore[no-untyped-call]
        served.append(GATEWAY_SERVICE)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    served.append(health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
    if reflection:
        enable_reflection(tuple(served), server)
    return server
