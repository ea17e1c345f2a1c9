"""The services a portable run needs, checked before anything runs: Beam's job service
(`--job_endpoint`) and an external worker pool (`--environment_type EXTERNAL
--environment_config HOST:PORT`). A service that does not answer is DependencyUnavailable
(exit 75: retry later) within seconds, instead of Beam waiting minutes and failing with a bare
timeout."""

from __future__ import annotations

import socket
from collections.abc import Sequence

from apache_beam.options.pipeline_options import PipelineOptions, PortableOptions

from vaewatch.model.errors import DependencyUnavailable

TIMEOUT_S = 20.0


class ServiceUnavailable(DependencyUnavailable):
    """A Beam service the run was pointed at did not answer."""


def _host_port(endpoint: str) -> tuple[str, int] | None:
    host, _, port = endpoint.rpartition(":")
    return (host.strip("[]") or "localhost", int(port)) if port.isdigit() else None


def _answers(endpoint: str, timeout: float) -> bool:
    address = _host_port(endpoint)
    if address is None:
        return True  # not host:port (e.g. a URL Beam resolves itself): let Beam try
    try:
        socket.create_connection(address, timeout=timeout).close()
    except OSError:
        return False
    return True


def check(beam_args: Sequence[str], timeout: float = TIMEOUT_S) -> None:
    portable = PipelineOptions(list(beam_args)).view_as(PortableOptions)
    wanted = []
    if portable.job_endpoint and portable.job_endpoint != "embed":
        wanted.append(("Beam job service (--job_endpoint)", portable.job_endpoint))
    if (portable.environment_type or "").upper() == "EXTERNAL" and portable.environment_config:
        wanted.append(("external worker pool (--environment_config)", portable.environment_config))
    for what, endpoint in wanted:
        if not _answers(endpoint, timeout):
            raise ServiceUnavailable(
                f"the {what} at {endpoint!r} did not answer within {timeout:.0f} s; nothing was "
                "done. Start it, or check the address and the network."
            )
