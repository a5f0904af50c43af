"""A Kubernetes API stand-in over TLS that unmodified kubectl works against.

No real kube-apiserver can run on these machines, so the tests and the quick-start demo talk to
this: discovery, CRUD with kube's semantics, watch, server-side Tables, pods/log and pods/exec over
WebSocket, HTTP/2 as kube-apiserver offers it (`--h2`, see h2front), bearer/EKS/client-certificate
authentication, and a record of every request it saw (`GET /_standin/requests`) so tests can check
what the gateway forwarded.
"""

from .server import StandinConfig, StandinServer

__all__ = ["StandinConfig", "StandinServer"]
