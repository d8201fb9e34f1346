"""Cloud TPU queued resources through the TPU API: create one node, read its state, delete it.

The client is google-cloud-tpu's `tpu_v2`: the GA API, the one `gcloud compute tpus
queued-resources` calls, with everything a job needs (spot, reservations, node metadata).
It speaks REST, so the tests' local fake of the API sees exactly what the real service gets.
Credentials are Application Default Credentials; with GEMMA_SAE_TPU_API_ENDPOINT set the
client talks to that endpoint without credentials (no TPU emulator exists; the tests point
it at a fake).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Literal

from sae.errors import SaeError

ENDPOINT_ENV = "GEMMA_SAE_TPU_API_ENDPOINT"
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
Provisioning = Literal["on-demand", "spot", "reserved"]
# Seconds a state query keeps retrying transient errors (503, resets) before giving up.
_RETRY_DEADLINE_S = 300.0


class TpuError(SaeError):
    """The TPU API refused or failed a request."""


@dataclass(frozen=True)
class NodeRequest:
    """One TPU slice as a queued resource; the node has the queued resource's name."""

    project: str
    zone: str
    name: str
    accelerator_type: str
    runtime_version: str
    startup_script: str
    provisioning: Provisioning = "on-demand"
    reservation: str = ""  # with "reserved": a reservation's name; empty: any in the project
    service_account: str = ""
    network: str = ""
    subnetwork: str = ""
    external_ips: bool = False

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.zone}"

    @property
    def queued_resource_name(self) -> str:
        return f"{self.parent}/queuedResources/{self.name}"

    @property
    def node_name(self) -> str:
        return f"{self.parent}/nodes/{self.name}"

    @property
    def reservation_name(self) -> str:
        if self.provisioning != "reserved":
            return ""
        if "/" in self.reservation:  # already a full resource name
            return self.reservation
        return f"{self.parent}/reservations/{self.reservation or '-'}"


@dataclass(frozen=True)
class QueueState:
    """A queued resource's state (WAITING_FOR_RESOURCES, ACTIVE, SUSPENDED, ...), why it
    failed, and who suspended it (SERVICE: a preemption; USER)."""

    state: str
    detail: str = ""
    initiator: str = ""


def queued_resource(request: NodeRequest) -> Any:
    """The API message for `request`, as `gcloud compute tpus queued-resources create` makes it."""
    from google.cloud import tpu_v2

    node = tpu_v2.Node(
        accelerator_type=request.accelerator_type,
        runtime_version=request.runtime_version,
        network_config=tpu_v2.NetworkConfig(
            network=request.network,
            subnetwork=request.subnetwork,
            enable_external_ips=request.external_ips,
        ),
        service_account=tpu_v2.ServiceAccount(email=request.service_account, scope=[SCOPE]),
        metadata={"startup-script": request.startup_script},
    )
    spec = tpu_v2.QueuedResource.Tpu.NodeSpec(
        parent=request.parent, node_id=request.name, node=node
    )
    resource = tpu_v2.QueuedResource(tpu=tpu_v2.QueuedResource.Tpu(node_spec=[spec]))
    if request.provisioning == "spot":
        resource.spot = tpu_v2.QueuedResource.Spot()
    resource.reservation_name = request.reservation_name
    return resource


class TpuQueue:
    """The queued-resource calls a submission makes, with API errors as one-line TpuErrors."""

    def __init__(self, client: Any | None = None) -> None:
        self._client = client or make_client()

    def create(self, request: NodeRequest) -> None:
        from google.api_core import exceptions

        try:
            self._client.create_queued_resource(
                parent=request.parent,
                queued_resource_id=request.name,
                queued_resource=queued_resource(request),
            )
        except exceptions.Conflict as error:  # REST reports ALREADY_EXISTS as a 409 Conflict
            raise TpuError(
                f"cannot create {request.name} in {request.zone}: {_message(error)} (one of that "
                "name already exists? delete it or choose another --tpu-name)"
            ) from None
        except _failures() as error:
            raise _api_error("create", request.name, error) from None

    def state(self, request: NodeRequest) -> QueueState | None:
        """The queued resource's state, None once it no longer exists."""
        from google.api_core import exceptions

        try:
            found = self._client.get_queued_resource(
                name=request.queued_resource_name, retry=_transient_retry()
            )
        except exceptions.NotFound:
            return None
        except _failures() as error:
            raise _api_error("read", request.name, error) from None
        state = found.state
        name = state.State(state.state).name
        detail = state.failed_data.error.message if name == "FAILED" else ""
        initiator = state.StateInitiator(state.state_initiator).name
        return QueueState(name, detail, "" if "UNSPECIFIED" in initiator else initiator)

    def node_state(self, request: NodeRequest) -> str | None:
        """The node's state (READY, PREEMPTED, ...), None while it does not exist."""
        from google.api_core import exceptions

        try:
            node = self._client.get_node(name=request.node_name, retry=_transient_retry())
        except exceptions.NotFound:
            return None
        except _failures() as error:
            raise _api_error("read the node of", request.name, error) from None
        return node.State(node.state).name

    def delete(self, request: NodeRequest) -> None:
        """Ask for the queued resource and its node to go (force: even while ACTIVE)."""
        from google.api_core import exceptions

        try:
            self._client.delete_queued_resource(
                request={"name": request.queued_resource_name, "force": True}
            )
        except exceptions.NotFound:
            return
        except _failures() as error:
            raise _api_error("delete", request.name, error) from None


def make_client() -> Any:
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import tpu_v2

    endpoint = os.environ.get(ENDPOINT_ENV)
    if endpoint:
        from google.auth.credentials import AnonymousCredentials

        return tpu_v2.TpuClient(
            credentials=AnonymousCredentials(),
            transport="rest",
            client_options={"api_endpoint": endpoint},
        )
    try:
        return tpu_v2.TpuClient(transport="rest")
    except DefaultCredentialsError:
        raise TpuError(
            "no Google Cloud credentials: run `gcloud auth application-default login` "
            "or set GOOGLE_APPLICATION_CREDENTIALS"
        ) from None


def _failures() -> tuple[type[BaseException], ...]:
    """What a request can fail with: an API error, retries running out, no connection (the
    REST transport's requests errors are OSErrors)."""
    from google.api_core import exceptions
    from google.auth.exceptions import TransportError

    return (
        exceptions.GoogleAPICallError,
        exceptions.RetryError,
        OSError,
        TransportError,
    )


def _transient_retry() -> Any:
    from google.api_core import retry

    return retry.Retry(predicate=retry.if_transient_error, timeout=_RETRY_DEADLINE_S)


def _message(error: Any) -> str:
    message = " ".join(str(getattr(error, "message", "") or error).split())
    # The REST transport prefixes the request ("POST https://...: "); the API's text suffices.
    return re.sub(r"^[A-Z]+ https?://\S+: ", "", message)[:300]


def _api_error(action: str, name: str, error: Any) -> TpuError:
    return TpuError(f"cannot {action} TPU {name}: {type(error).__name__}: {_message(error)}")
