"""Where a Serve replica's own server listens.

Ray Serve 2.60 gives every replica a gRPC server for calls between deployments, and binds it to ``[::]``
(every interface) with no option to say otherwise (``ray.serve._private.replica``: ``Replica._on_initialized``
calls ``add_port_to_grpc_server(server, "[::]:0")``). Routers dial a replica at its node's address, so
binding that address instead keeps it reachable while a private loopback Ray keeps it on 127.0.0.1.
"""

from __future__ import annotations

import ray


def bind_replica_server_to_node_ip() -> None:
    """Make this replica's inter-deployment server listen on the node's address only. Call it first in a
    deployment's ``__init__``: Serve opens the server after ``__init__`` returns. Idempotent."""
    import ray.serve._private.replica as replica

    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "pearl_node_ip", False):
        return  # another Ray: nothing to adjust, or already done in this process
    node_ip = ray.util.get_node_ip_address()
    host = f"[{node_ip}]" if ":" in node_ip else node_ip

    def add_port(server, address: str):
        if address.startswith("[::]:"):
            address = f"{host}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    add_port.pearl_node_ip = True
    replica.add_port_to_grpc_server = add_port
