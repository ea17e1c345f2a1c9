"""Keep the local runner's gRPC servers on the loopback interface.

With `--workers N` (N > 1) Beam's FnApiRunner starts worker processes and talks to them over
gRPC: four servers (control, data, state, logging) plus one logging server per worker, all
bound to `[::]:0`: every interface, no TLS, no authentication, for as long as the job runs.
Anyone who can reach the machine could connect to the control plane. Beam has no option for
the bind address (apache_beam 2.77: runners/portability/fn_api_runner/worker_handlers.py and
runners/portability/local_job_service.py), but the workers are always told to dial
`localhost:PORT`, so binding to `localhost` instead changes nothing for them. `loopback_only()`
does that for the duration of one run, in those two modules only.
"""

from __future__ import annotations

import contextlib
import threading

_lock = threading.Lock()
ANY_ADDRESS_PREFIXES = ("[::]:", "0.0.0.0:")


class _LoopbackServer:
    def __init__(self, server):
        self._server = server

    def add_insecure_port(self, address: str) -> int:
        for prefix in ANY_ADDRESS_PREFIXES:
            if address.startswith(prefix):
                address = "localhost:" + address[len(prefix) :]
        return self._server.add_insecure_port(address)

    def __getattr__(self, name):
        return getattr(self._server, name)


class _LoopbackGrpc:
    """The grpc module as worker_handlers sees it, with `server()` wrapped."""

    def __init__(self, grpc_module):
        self._grpc = grpc_module

    def server(self, *args, **kwargs):
        return _LoopbackServer(self._grpc.server(*args, **kwargs))

    def __getattr__(self, name):
        return getattr(self._grpc, name)


@contextlib.contextmanager
def loopback_only():
    from apache_beam.runners.portability import local_job_service
    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    modules = (worker_handlers, local_job_service)
    with _lock:
        originals = [module.grpc for module in modules]
        for module, original in zip(modules, originals, strict=True):
            module.grpc = _LoopbackGrpc(original)
        try:
            yield
        finally:
            for module, original in zip(modules, originals, strict=True):
                module.grpc = original
