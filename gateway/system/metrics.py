"""The gateway's metrics in the Prometheus text format (prometheus-client).

`exposition()` is what the operator listener's `/metrics` answers with."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest


def exposition() -> tuple[bytes, str]:
    """The current metrics as (body, content type)."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
