"""Where a run's sockets listen: a single-node run listens on loopback only.

torch's default ``env://`` rendezvous has rank 0 host a ``TCPStore`` that listens on every interface
(``::`` or ``0.0.0.0``), whatever ``MASTER_ADDR`` says: ``MASTER_ADDR`` only tells the other ranks
where to connect. Gloo's connections listen on the address the machine's host name resolves to
(often an external one), NCCL's bootstrap on the first non-loopback interface. On one node nothing
outside the machine needs to reach any of them, so when ``MASTER_ADDR`` is a loopback address this
module binds the store to that address itself (``TCPStore(master_listen_fd=...)``) and points gloo
and NCCL at the loopback interface (``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME``, unless set).

A multi-node run (``MASTER_ADDR`` not loopback) is left to torch: other hosts must reach the store
and the collectives' ports, and only the user knows which interface they use.
"""

from __future__ import annotations

import atexit
import gc
import ipaddress
import logging
import os
import signal
import socket
import weakref
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import psutil
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from lightning.fabric.plugins import ClusterEnvironment

log = logging.getLogger(__name__)

# The variables that choose the interface gloo and NCCL listen on (read by their C++ code when a
# process group is created, so they must be set in this process's environment before that).
INTERFACE_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def loopback_addresses(host: str) -> list[tuple[socket.AddressFamily, str]]:
    """The (family, address) pairs ``host`` resolves to, if every one is loopback; else ``[]``.

    A literal address needs no lookup; a name such as ``localhost`` is resolved, and counts as
    loopback only when all its addresses are (a name that also resolves externally does not).
    """
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    addresses = [(family, str(sockaddr[0])) for family, _, _, _, sockaddr in infos]
    if not addresses or not all(_is_loopback(address) for _, address in addresses):
        return []
    return list(dict.fromkeys(addresses))  # deduplicated, in the resolver's order


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` names this machine's loopback only (127.0.0.0/8, ``::1``, ``localhost``)."""
    return bool(loopback_addresses(host))


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def loopback_interface() -> str | None:
    """The name of the network interface that carries 127.0.0.1 (``lo`` on Linux, ``lo0`` on macOS)."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and _is_loopback(a.address) for a in addresses):
            return name
    return None


def restrict_backends_to_loopback() -> dict[str, str]:
    """Point gloo and NCCL at the loopback interface, leaving any choice the user made alone.

    Returns the variables it set; :func:`restore_backend_interfaces` unsets them. Without this, gloo
    listens on whatever the host name resolves to, which is an external address on many machines, and
    NCCL skips ``lo`` unless told otherwise.
    """
    interface = loopback_interface()
    if interface is None:
        return {}
    chosen = {name: interface for name in INTERFACE_VARIABLES if not os.environ.get(name)}
    for name in chosen:
        _set_by_us.setdefault(name, os.environ.get(name))
    os.environ.update(chosen)
    return chosen


def restore_backend_interfaces() -> None:
    """Give back the interface variables :func:`restrict_backends_to_loopback` set, as they were before.

    Called when a run ends. The run's groups keep listening where they were created (gloo and NCCL read
    the variables only when a group, or NCCL's first communicator, is created), while whatever the
    process does next (another ``fit``, its own ``init_process_group``) is not pinned to loopback by us.
    """
    for name, previous in _set_by_us.items():
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
    _set_by_us.clear()


# Interface variables set by `restrict_backends_to_loopback` for the current run, and their values before.
_set_by_us: dict[str, str | None] = {}


def listen_socket(family: socket.AddressFamily, address: str, port: int) -> int:
    """A socket listening on ``address:port`` only, as a file descriptor the caller then owns."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As torch's own store does: a port left in TIME_WAIT by an earlier run can be bound again.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(socket.SOMAXCONN)
    except OSError as err:
        sock.close()
        raise OSError(err.errno, f"cannot listen on {address}:{port} for the process group's store: {err}") from err
    return sock.detach()  # the TCPStore server closes it, not Python's garbage collector


def loopback_store(host: str, port: int, rank: int, world_size: int, timeout: timedelta) -> dist.TCPStore:
    """The run's ``TCPStore`` on loopback ``host``: rank 0 serves it on that address only, the others connect.

    Same arguments as torch's ``env://`` rendezvous gives its store (multi-tenant, libuv unless
    ``USE_LIBUV=0``), except that the server socket is bound here rather than on every interface.
    """
    addresses = loopback_addresses(host)
    if not addresses:
        raise ValueError(f"{host!r} is not a loopback address: a store there must be reachable from other hosts.")
    # Every rank resolves the same name on the same machine to the same first address.
    family, address = addresses[0]
    use_libuv = os.environ.get("USE_LIBUV", "1") == "1"
    if rank != 0:
        return dist.TCPStore(address, port, world_size, is_master=False, timeout=timeout, use_libuv=use_libuv)
    if _serving_here(address, port):
        # A group destroyed while something (a DeviceMesh, say) still holds its store leaves this process's
        # server listening; torch's multi-tenant cache hands that same server back, as under env://.
        return dist.TCPStore(
            address, port, world_size, is_master=True, timeout=timeout, multi_tenant=True, use_libuv=use_libuv
        )
    return dist.TCPStore(
        address, port, world_size, is_master=True, timeout=timeout, multi_tenant=True,
        master_listen_fd=listen_socket(family, address, port), use_libuv=use_libuv,
    )


def _serving_here(address: str, port: int) -> bool:
    """Whether this very process listens on ``address:port`` (its own store server, still alive)."""
    return any(
        c.status == psutil.CONN_LISTEN and (c.laddr.ip, c.laddr.port) == (address, port)
        for c in psutil.Process().net_connections(kind="inet")
    )


def _torchelastic_agent_hosts_store() -> bool:
    # torchrun's agent already serves the store on MASTER_PORT; the ranks must only connect to it.
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)


def agent_store(address: str, port: int, world_size: int, timeout: timedelta) -> dist.Store:
    """torchrun's agent store, under a prefix of its own for this start of the workers.

    torchrun's c10d rendezvous creates its store once and serves it for every round (torch 2.13): workers
    that it starts again after a failure (``--max-restarts``) connect to the same store and find the keys
    the previous workers wrote, among them rank 0's old gloo or NCCL address, and fail with "Connection
    refused" (pytorch/pytorch#167288). torch's own ``env://`` path adds no per-start prefix, so this does:
    the restart count and the world size name the start. A membership change that keeps both (a node
    replaced at once by another) is not told apart: its first attempt fails that way and torchrun's next
    restart, counted anew, succeeds.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    client = dist.TCPStore(address, port, world_size=world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"default_pg/parti-start-{restart}-of-{world_size}", client)


def init_process_group(
    backend: str,
    *,
    main_address: str,
    main_port: int,
    rank: int,
    world_size: int,
    timeout: timedelta,
    device_id: torch.device | None = None,
) -> None:
    """Initialize the default process group, listening on loopback only when ``main_address`` is loopback.

    Otherwise the same as Lightning's ``_init_dist_connection``: ``MASTER_ADDR``/``MASTER_PORT`` are
    set for code that reads them, nothing happens when a group exists already, and an NCCL group is
    destroyed at exit. Under torchrun the agent's store is used as is (torchrun decides where it listens).
    """
    if dist.is_initialized():
        return
    os.environ["MASTER_ADDR"] = main_address
    os.environ["MASTER_PORT"] = str(main_port)
    store = None
    if _torchelastic_agent_hosts_store():
        store = agent_store(main_address, main_port, world_size, timeout)
    if is_loopback_host(main_address):
        chosen = restrict_backends_to_loopback()
        if store is None:
            # The prefix is what torch's env:// path adds, so keys are laid out as they would be there.
            store = dist.PrefixStore("default_pg", loopback_store(main_address, main_port, rank, world_size, timeout))
        log.info(f"rank {rank}: process group on loopback {main_address}:{main_port}; set {chosen or 'nothing'}")
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=timeout, device_id=device_id
    )
    # Destroy the groups at exit, while the interpreter still runs, for every backend (Lightning does it
    # for NCCL only). A gloo worker thread that releases a finished collective can hold the last
    # reference to a tensor whose Python object it must free under the GIL; if that happens once
    # interpreter finalization has begun, Python ends the thread inside a C++ destructor and the process
    # aborts ("terminate called without an active exception", SIGABRT) after a successful run. Destroying
    # the groups here joins those threads first. At exit, not in `teardown`: later Trainers in the same
    # process reuse the group, and a ZeRO-2/3 module still runs collectives after `fit`.
    global _destroy_at_exit_registered
    if not _destroy_at_exit_registered:
        atexit.register(_destroy_process_group)
        _destroy_at_exit_registered = True


def init_dist_connection(
    cluster_environment: ClusterEnvironment,
    backend: str,
    *,
    timeout: timedelta,
    device_id: torch.device | None = None,
) -> None:
    """:func:`init_process_group` with the address, port and ranks of a Lightning cluster environment.

    A drop-in for Lightning's ``_init_dist_connection(cluster_environment, backend, timeout=..., device_id=...)``.
    """
    if dist.is_initialized():
        # A later run in this process reuses the group, but builds its mesh's groups anew: on loopback too.
        if is_loopback_host(cluster_environment.main_address):
            restrict_backends_to_loopback()
        return
    init_process_group(
        backend,
        main_address=cluster_environment.main_address,
        main_port=cluster_environment.main_port,
        rank=cluster_environment.global_rank(),
        world_size=cluster_environment.world_size(),
        timeout=timeout,
        device_id=device_id,
    )


_destroy_at_exit_registered = False
# Meshes built for this process's runs (see `track_mesh`).
_meshes: weakref.WeakSet[Any] = weakref.WeakSet()


def track_mesh(mesh: Any) -> None:
    """Let the exit handler release ``mesh``'s process groups.

    DTensor's sharding caches keep a ZeRO-2/3 run's mesh alive until interpreter finalization, and the
    mesh keeps its groups, so their gloo threads would outlive `destroy_process_group` (see
    `init_process_group` for why that can abort the process).
    """
    _meshes.add(mesh)


def _destroy_process_group() -> None:
    # Not interruptible by Ctrl+C half-way, as in Lightning's own exit handler.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
            for mesh in list(_meshes):
                # torch offers no public way to drop a mesh's groups; the registry is a plain dict.
                registry = getattr(mesh, "_pg_registry", None)
                if isinstance(registry, dict):
                    registry.clear()
            # A group's C++ object (and gloo's threads) goes when its last reference does: often a finished
            # Trainer's strategy and mesh, kept only by reference cycles. Free those now, not during finalization.
            gc.collect()
    finally:
        signal.signal(signal.SIGINT, previous)
