"""The one exception type a CSI handler raises to end a call with a status code."""

from __future__ import annotations

import grpc


class CsiError(Exception):
    """End the current call with `code`; `message` is shown to the kubelet and logged."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
