"""Connecting to Ray (``pip install 'dsstream[ray]'``), for batch transcription
(:mod:`dsstream.batch_ray`) and serving (:mod:`dsstream.serve_ray`).

``connect(None)`` starts a private local cluster on this machine with every
Ray listener on the loopback interface and usage statistics off
(:data:`LOOPBACK_ENV`, set before ``ray`` is imported); ``connect(ADDRESS)``
joins a running cluster (``ray start``), whose nodes need dsstream installed
(a cluster at a loopback address gets the same settings).
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

__all__ = ["LOOPBACK_ENV", "connect", "keep_internal_server_on_loopback"]

# Ray reads these when it is imported.  On Linux it otherwise takes the host's
# address as the node's even when 127.0.0.1 is asked for, and binds its
# servers there; with cluster mode off it binds them to 127.0.0.1.
LOOPBACK_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start a local, loopback-only Ray (``address=None``) or join the cluster at
    ``address`` (``HOST:PORT`` of its head, or ``"auto"``).  A process already
    connected stays connected."""
    from engine.extras import require

    require("ray", "ray", "running on Ray")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if address is None or _is_loopback(address):
        # Ray would otherwise swap 127.0.0.1 for the host's address, and find
        # no cluster there.
        os.environ.update(LOOPBACK_ENV)
    import ray

    if ray.is_initialized():
        return
    quiet: dict[str, Any] = {"logging_level": "WARNING", "configure_logging": True}
    if address is None:
        # "local": a new cluster even where `ray start` left one running.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", **quiet)  # fmt: skip
    else:
        ray.init(address=address, **quiet)


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or "auto"
        return False


def keep_internal_server_on_loopback() -> None:
    """On a cluster whose nodes are on loopback addresses (this machine's own,
    as `dsstream serve --ray` starts it), bind the replica's inter-deployment
    gRPC server to 127.0.0.1 instead of every interface.

    Serve (2.60) binds it to ``[::]:0`` unconditionally, after the replica's
    constructor runs; nothing here calls other deployments, and on a loopback
    cluster no other host may reach it.  On a real cluster it stays as Serve
    has it (the other nodes need it)."""
    import ipaddress

    import ray
    from ray.serve._private import replica

    if not ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback:
        return
    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "dsstream_loopback", False):
        return  # another Ray; or done already in this process

    def loopback(server: Any, address: str) -> Any:
        return bind(server, address.replace("[::]", "127.0.0.1"))

    loopback.dsstream_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = loopback
