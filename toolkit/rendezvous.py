"""torchrun rendezvous for one machine whose store listens on 127.0.0.1 only.

    accelerate launch --config_file launch/cpu_ddp.yaml toolkit/train.py --config ...
    torchrun --rdzv_backend toolkit-loopback --nproc_per_node 2 toolkit/train.py --config ...

Why: `accelerate launch` runs torchrun's "static" rendezvous, whose agent creates the run's
TCPStore server with `TCPStore(host, port, is_master=True)`; that binds `::` (every interface,
IPv4 too) whatever host it is given, is unauthenticated, and lives for the whole run. TCPStore
has no bind-address option, but it can take a socket that is already bound (`master_listen_fd`,
served by the default libuv server in torch 2.14), so this handler binds 127.0.0.1 itself and
hands the socket over. Otherwise it is the static rendezvous for one node: rank 0 of a world of
one, the agent hosts the store and the workers connect to it as clients (`use_agent_store`).

torchrun finds it by name through the `torchrun.handlers` entry point in pyproject.toml, so the
package must be installed (`make venv` does `pip install -e .`); an uninstalled checkout fails
at start with "rendezvous backend 'toolkit-loopback' is not registered".

Port: torchrun hands a non-static backend no master port (and Accelerate passes
`main_process_port` to torchrun only as that), so the store takes the port of `--rdzv_endpoint`
when one is given and otherwise a free one chosen by the OS; the workers learn it from the agent
(MASTER_ADDR/MASTER_PORT), nothing outside the machine needs it.

The ranks' own sockets (gloo's pair connections, NCCL's bootstrap) follow GLOO_SOCKET_IFNAME /
NCCL_SOCKET_IFNAME, else the host name's address or the first usable interface. On one machine
loopback is the right answer, so the handler sets both to the loopback interface in the agent's
environment, which the workers inherit, unless they are already set.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket

# torch.distributed.elastic.rendezvous imports this module while it registers its handlers:
# import from its submodules, which are loaded by then, and nothing heavy.
from torch.distributed import PrefixStore, TCPStore
from torch.distributed.elastic.rendezvous.api import (RendezvousHandler, RendezvousInfo, RendezvousParameters,
                                                      RendezvousStoreInfo)
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

NAME = "toolkit-loopback"  # the entry point's name in pyproject.toml; what --rdzv_backend takes
HOST = "127.0.0.1"
LOOPBACK_NAMES = ("localhost", "127.0.0.1")
DEFAULT_TIMEOUT_S = 600  # torchrun's static rendezvous uses the same

log = logging.getLogger(__name__)


def loopback_interface() -> str | None:
    """The loopback interface's name (`lo` on Linux, `lo0` on macOS), or None if there is none."""
    try:
        names = {name for _, name in socket.if_nameindex()}
    except OSError:
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def bind_loopback(port: int) -> socket.socket:
    """A TCP socket bound to 127.0.0.1:port (0: the OS picks), listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TCPStore's own server does
        sock.bind((HOST, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


class LoopbackRendezvous(RendezvousHandler):
    """torchrun's static rendezvous for one node, with the store bound to 127.0.0.1."""

    def __init__(self, port: int, run_id: str, timeout: datetime.timedelta):
        self.port = port  # 0 until the store exists when the OS picks it
        self.run_id = run_id
        self.timeout = timeout
        self._store: TCPStore | None = None

    def get_backend(self) -> str:
        return NAME

    @property
    def use_agent_store(self) -> bool:
        # The workers must connect to the agent's store; otherwise rank 0 would start a second
        # server on MASTER_PORT with TCPStore's default bind (every interface).
        return True

    def next_rendezvous(self) -> RendezvousInfo:
        if self._store is None:
            sock = bind_loopback(self.port)
            self.port = sock.getsockname()[1]
            # detach(): the store owns the descriptor from here on and closes it itself.
            self._store = TCPStore(HOST, self.port, world_size=1, is_master=True, timeout=self.timeout,
                                   master_listen_fd=sock.detach())
            log.info("rendezvous store on %s:%d (loopback only)", HOST, self.port)
        return RendezvousInfo(PrefixStore(self.run_id, self._store), rank=0, world_size=1,
                              bootstrap_store_info=RendezvousStoreInfo(HOST, self.port))

    def is_closed(self) -> bool:
        return False

    def set_closed(self) -> None:
        pass

    def num_nodes_waiting(self) -> int:
        return 0

    def get_run_id(self) -> str:
        return self.run_id

    def shutdown(self) -> bool:
        return True


def create_handler(params: RendezvousParameters) -> LoopbackRendezvous:
    """torchrun's handler factory: checks that the run is one node and the endpoint is loopback."""
    if params.max_nodes != 1:
        raise ValueError(f"the {NAME} rendezvous serves one machine, this run asks for {params.max_nodes}; "
                         "use rdzv_backend static across machines (launch/multi_node.yaml)")
    host, port = parse_rendezvous_endpoint(params.endpoint, default_port=0)
    if host not in LOOPBACK_NAMES:
        raise ValueError(f"the {NAME} rendezvous listens on {HOST} only; got the endpoint {params.endpoint!r}")
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):  # inherited by the workers
        if var not in os.environ and (lo := loopback_interface()):
            os.environ[var] = lo
    timeout = datetime.timedelta(seconds=params.get_as_int("timeout", DEFAULT_TIMEOUT_S))
    return LoopbackRendezvous(port, params.run_id, timeout)


def handler_creator():
    """The `torchrun.handlers` entry point: torchrun calls it once and registers what it returns."""
    return create_handler
