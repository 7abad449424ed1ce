"""A two-node Ray cluster on this machine for the Ray tests, loopback only.

A head node that does no work (0 CPUs, as production heads are often run)
and a worker node joined to it, each its own raylet and object store, so
tasks and actors are placed on another node than the driver's and results
cross between object stores.  Usage statistics off, no dashboard, every
listener on 127.0.0.1 (:func:`non_loopback_listeners` checks it).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dsstream.ray_cluster import LOOPBACK_ENV

RAY = Path(sys.executable).parent / "ray"


def ray_env() -> dict[str, str]:
    return {**os.environ, **LOOPBACK_ENV}


def stop() -> None:
    """Stop every Ray process of this machine (a private cluster a killed CLI left)."""
    subprocess.run([str(RAY), "stop", "--force"], env=ray_env(), capture_output=True, timeout=120)


@contextlib.contextmanager
def two_nodes(worker_cpus: int = 2) -> Iterator[Any]:
    """Yield the cluster (``ray.cluster_utils.Cluster``: ``.address`` is the
    head's, ``127.0.0.1:PORT``; ``.add_node`` adds more); stop every node after.

    Ray's own test cluster (``ray.cluster_utils.Cluster``) starts the nodes as
    this process's children: ``ray start`` refuses to join a second node while
    cluster mode is off, the switch that keeps Ray's servers on 127.0.0.1."""
    os.environ.update(LOOPBACK_ENV)  # read when ray is imported, just below
    from ray.cluster_utils import Cluster

    small = {"object_store_memory": 100_000_000}
    cluster = Cluster(
        initialize_head=True, connect=False,
        head_node_args={"num_cpus": 0, "include_dashboard": False, **small},
    )  # fmt: skip
    try:
        cluster.add_node(num_cpus=worker_cpus, **small)
        yield cluster
    finally:
        cluster.shutdown()


def _ray_pids() -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"site-packages/ray/" in cmdline or cmdline.startswith(b"ray::"):
            pids.add(int(entry.name))
    return pids


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in (Path("/proc") / str(pid) / "fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def _hex_ip(text: str) -> str:
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc/net/tcp6 holds four little-endian 32-bit words.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def non_loopback_listeners() -> list[str]:
    """Listening TCP sockets of Ray's processes bound elsewhere than loopback."""
    inodes: dict[str, int] = {}
    for pid in _ray_pids():
        for inode in _socket_inodes(pid):
            inodes[inode] = pid
    bad = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            ip = ipaddress.ip_address(_hex_ip(local.split(":")[0]))
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if not ip.is_loopback:
                bad.append(f"pid {inodes[inode]} listens on {ip}:{int(local.split(':')[1], 16)}")
    return bad
