"""The CSI Identity service: who this plugin is and whether it is ready."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf import wrappers_pb2

from . import __version__
from .pb import csi_pb2, csi_pb2_grpc


class IdentityService(csi_pb2_grpc.IdentityServicer):  # type: ignore[misc]
    def __init__(self, driver_name: str, ready: Callable[[], bool]) -> None:
        self._driver_name = driver_name
        self._ready = ready

    def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=self._driver_name, vendor_version=__version__)

    def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        # No controller service and no topology: a node plugin only.
        return csi_pb2.GetPluginCapabilitiesResponse()

    def Probe(
        self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ProbeResponse:
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=self._ready()))
