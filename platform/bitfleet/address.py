"""Which Ray cluster a command talks to, and one quick try that something answers there.

Ray's clients let RAY_ADDRESS (and, for Ray Jobs, RAY_API_SERVER_ADDRESS) override the address they are
given in code, and retry an address that does not answer for a minute or more. A bitfleet command's
`--address` wins over both variables, the variables come next (in Ray's order), and before any Ray client
is built the address is tried once, with a short timeout and this client's token: a cluster that is down,
a mistyped address or a missing token fails in seconds with one line.
"""
from __future__ import annotations

import os
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from bitfleet.errors import ClusterError

TIMEOUT_S = 3.0
JOBS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # what Ray's job client reads, in its order
DRIVER_VARIABLES = ("RAY_ADDRESS",)  # what ray.init reads
DEFAULT_PORTS = {"ray": 10001, "tcp": 6379}  # Ray client server, GCS


def jobs_address(flag: str | None) -> str:
    """The Ray Jobs address of a command (its dashboard URL, or the cluster's HOST:PORT), checked to answer."""
    address = _chosen(flag, JOBS_VARIABLES)
    if not address:
        raise ClusterError("no Ray cluster given: pass --address http://HEAD:8265 (the cluster's dashboard) "
                           "or export RAY_ADDRESS")
    address = _found(address)
    check(address)
    return address


def driver_address(flag: str | None) -> str:
    """The HOST:PORT (or ray://) a driver joins, checked to answer: the flag, RAY_ADDRESS, else the cluster this
    machine started last (Ray's `auto`)."""
    address = _chosen(flag, DRIVER_VARIABLES) or "auto"
    if urlsplit(address).scheme in ("http", "https"):
        raise ClusterError(f"--address {address}: this command joins the cluster; give its address HEAD:6379, "
                           "not the dashboard's URL")
    address = _found(address)
    check(address)
    return address


def check(address: str) -> None:
    """One try within TIMEOUT_S: a dashboard URL must answer HTTP as Ray's dashboard, a cluster address (HOST:PORT)
    answer as a Ray cluster (its GCS), a Ray client address (ray://) accept a connection."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme in ("http", "https"):
        _answers_http(address.rstrip("/"))
        return
    try:
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise ClusterError(f"--address {address}: expected http://HOST:PORT (the dashboard), HOST:PORT or "
                           "ray://HOST:PORT")
    try:
        if parts.scheme == "tcp":
            _answers_gcs(f"{parts.hostname}:{port}")
        else:
            socket.create_connection((parts.hostname, port), timeout=TIMEOUT_S).close()
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {_reason(exc)}; is it up, and is that its "
                           "address?") from None


@contextmanager
def only(address: str, variables: tuple[str, ...]) -> Iterator[None]:
    """Ray's clients read `variables` before the address they are given: inside the block they name `address`."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(dict.fromkeys(variables, address))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _answers_http(url: str) -> None:
    """Ask the dashboard its version, with this client's token as Ray's job client sends it."""
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    request = urllib.request.Request(f"{url}/api/version", headers=get_auth_headers_if_auth_enabled({}))
    try:
        urllib.request.urlopen(request, timeout=TIMEOUT_S).close()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise ClusterError(_refused(url)) from None
        if exc.code == 404:
            raise ClusterError(f"{url} answers, but not as a Ray dashboard (no /api/version); is that the "
                               "cluster's dashboard (http://HEAD:8265)?") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise ClusterError(f"cannot reach the Ray dashboard at {url}: {_reason(reason)}; is the cluster up, and is "
                           "that its dashboard (http://HEAD:8265)?") from None


def _answers_gcs(address: str) -> None:
    """Ask the GCS for the cluster id, what a driver asks first. Anything but an answer (a refused token, something
    else listening there) Ray would retry for a minute."""
    import grpc
    from ray._private.authentication.grpc_authentication_client_interceptor import (
        SyncAuthenticationMetadataClientInterceptor,
    )
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:  # with this client's token, as Ray's own clients send it
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(
                grpc.intercept_channel(channel, SyncAuthenticationMetadataClientInterceptor())).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=TIMEOUT_S)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                raise ClusterError(_refused(address)) from None
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError from None
            detail = re.split(r"ipv[46]:\S+: ", exc.details() or "")[-1] or exc.code().name  # gRPC's, past the address
            if exc.code() == grpc.StatusCode.UNAVAILABLE and "HTTP/2" not in detail:
                raise OSError(0, detail) from None  # connection refused, no route to the host, ...
            raise OSError(0, f"what answers there is not a Ray cluster ({detail})") from None


def _refused(address: str) -> str:
    return (f"the Ray cluster at {address} refused this client: it uses token auth; export RAY_AUTH_MODE=token and "
            "its token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or the file ~/.ray/auth_token)")


def _reason(exc) -> str:
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"no answer within {TIMEOUT_S:.0f} s"
    return getattr(exc, "strerror", None) or str(exc)


def _found(address: str) -> str:
    """`auto`: the cluster this machine started last, as Ray finds it."""
    if address != "auto":
        return address
    from ray._private.services import canonicalize_bootstrap_address_or_die

    try:
        return canonicalize_bootstrap_address_or_die("auto")
    except ConnectionError as exc:
        raise ClusterError(f"no Ray cluster found on this machine ({_first_line(exc)}); pass --address "
                           "or export RAY_ADDRESS") from None


def _chosen(flag: str | None, variables: tuple[str, ...]) -> str | None:
    return flag or next((os.environ[name] for name in variables if os.environ.get(name)), None)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
