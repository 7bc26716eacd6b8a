"""`imagegen serve`: check the bind is safe, build the app and run it under uvicorn; the named
models load in the background and stay resident."""

from __future__ import annotations

import ipaddress
import logging
import signal
from types import FrameType

import uvicorn

from server import errors
from server.http.state import AppState
from server.service import ImageService
from server.settings import Settings

log = logging.getLogger("server.http")

# After SIGTERM the process is gone within this long (supervisors wait about as long before
# SIGKILL: Kubernetes' default grace is 30 s, systemd's 90 s).
GRACEFUL_SHUTDOWN_S = 30
# Of that, requests, jobs and their event streams in flight get this long to finish; the rest
# is for stopping what did not and closing the service.
DRAIN_S = GRACEFUL_SHUTDOWN_S - 5


class InsecureBindError(errors.InvalidRequestError):
    code = "insecure_bind"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything, so treat it as public


def check_bind(host: str, *, has_keys: bool, insecure_no_auth: bool) -> None:
    if has_keys or insecure_no_auth or is_loopback(host):
        return
    raise InsecureBindError(
        f"refusing to listen on {host} without API keys: anyone who can reach this port could "
        "generate images. Set keys with IMAGEGEN_SERVER__API_KEYS='[\"your-key\"]' or "
        '`api_keys = ["your-key"]` under [server] in the --config file (a key may also be '
        'given as "sha256:<hex digest>"), or pass --insecure-no-auth to serve without '
        "authentication",
        param="host",
    )


def run(
    settings: Settings,
    *,
    models: list[str],
    host: str | None = None,
    port: int | None = None,
    insecure_no_auth: bool = False,
    service: ImageService | None = None,
) -> None:
    """Serve until stopped. Exits with an error (the CLI's exit code 1) when the named models
    cannot be loaded or the device fails for good, so that a supervisor restarts it.
    `service` is a test seam (a service over a backend that fails on demand)."""
    from server.http.app import create_app

    names = list(models) or list(settings.server.models) or [settings.default_model]
    server_settings = settings.server.model_copy(
        update={
            "host": host or settings.server.host,
            "port": port if port is not None else settings.server.port,
            "models": names,
            "insecure_no_auth": insecure_no_auth or settings.server.insecure_no_auth,
        }
    )
    check_bind(
        server_settings.host,
        has_keys=bool(server_settings.api_keys),
        insecure_no_auth=server_settings.insecure_no_auth,
    )
    settings = settings.model_copy(update={"server": server_settings})
    _configure_logging()
    app = create_app(settings, service=service)
    state: AppState = app.state.imagegen
    for name in names:
        if not state.service.knows_model(name):  # unknown names fail here, before the bind
            raise errors.ModelNotFoundError.for_model(name)
    if server_settings.insecure_no_auth and not server_settings.api_keys:
        log.warning("serving without authentication (--insecure-no-auth)")

    config = uvicorn.Config(
        app,
        host=server_settings.host,
        port=server_settings.port,
        log_level="info",
        # A little past the drain: event streams end themselves at DRAIN_S, with their end.
        timeout_graceful_shutdown=DRAIN_S + 1,
    )
    server = _DrainingServer(config, state)
    failure: list[str] = []

    fault: list[str] = []

    def on_load_failed(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    def on_device_fault(message: str) -> None:
        # Called from the device's thread: uvicorn polls should_exit, and in-flight requests
        # get their errors (the device refuses all work now) before it stops.
        log.critical("the device failed for good; stopping so a supervisor restarts: %s", message)
        fault.append(message)
        server.should_exit = True

    state.on_load_failed = on_load_failed
    state.service.on_device_fault(on_device_fault)
    server.run()
    if fault:
        raise errors.DeviceFaultError(f"stopped after a device fault: {fault[0]}")
    if failure:
        raise errors.ModelUnavailableError(f"could not load the models to serve: {failure[0]}")


class _DrainingServer(uvicorn.Server):
    """On SIGINT/SIGTERM the app starts draining at once: /readyz turns 503 (load balancers
    stop sending work), the port closes and new generations are refused with 503, while
    requests and jobs in flight finish (their event streams deliver their end) within DRAIN_S.
    A drained SIGTERM exits 0: it is how supervisors stop a service, not a failure."""

    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.app_state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.app_state.readiness.drain(DRAIN_S)
        if sig == signal.SIGTERM:
            # Not uvicorn's handler: it re-raises the signal once the drain is done, and
            # SIGTERM's default action then kills the process (exit status -15, not 0). A
            # second SIGTERM changes nothing: the supervisor's SIGKILL is the hard stop.
            self.should_exit = True
            return
        super().handle_exit(sig, frame)  # Ctrl-C: a second one stops at once


def _configure_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
