"""The device side of edgedeploy: runtimes, the data plane, gRPC/REST servers and the fleet daemon."""

__version__ = "0.1.0"
