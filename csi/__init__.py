"""The CSI side of SecretFS: gRPC Identity and Node services and what they drive."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("secretfs")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0.0.0"
