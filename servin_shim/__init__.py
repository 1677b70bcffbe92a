"""servin-shim: a Kubernetes container runtime that serves the CRI and runs pods with runc or crun."""

__version__ = "0.1.0"

#: The runtime name and API version reported by the Version RPC.
RUNTIME_NAME = "servin-shim"
CRI_API_VERSION = "v1"
