"""What every session of a gateway process shares: the config, the VAD service, the ASR
pools, the metrics, the record store, and the registries of live sessions (admitted,
parked, by flowId). ``gateway/server.py`` builds one; ``gateway.session`` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from .asrlink import AsrPools
from .config import GatewayConfig
from .metrics import GatewayMetrics
from .records import ArchiveRetrier, RecordStore, default_fallback_dir
from .vadservice import VadService

if TYPE_CHECKING:
    from .auth import Authenticator
    from .session import Session
    from .signing import UrlSigner


@dataclass
class GatewayContext:
    """Process-wide parts every session uses."""

    cfg: GatewayConfig
    vad: VadService
    pools: AsrPools
    metrics: GatewayMetrics
    store: RecordStore | None
    public_base: str
    shutting_down: trio.Event = field(default_factory=trio.Event)
    drained: trio.Event = field(default_factory=trio.Event)  # shutting down, no sessions
    sessions: set[Session] = field(default_factory=set)
    fallback_dir: Path = field(default_factory=default_fallback_dir)
    # flowId -> a session whose client disconnected, waiting RESUME_WINDOW_S for it
    parked: dict[str, Session] = field(default_factory=dict)
    archive_retrier: ArchiveRetrier | None = None
    # Verifies start.auth.token (None: no authentication; then no tenant either).
    auth: Authenticator | None = None
    # Signs record_url (None: plain URLs, for a store no one else can reach).
    signer: UrlSigner | None = None
    # flowId -> its admitted session (parked ones included): a flowId is live once.
    # With --workers, a registry over the instance that can also count a tenant's
    # sessions everywhere (``tenant_sessions``).
    flows: dict[str, Session] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.auth is None and (self.cfg.auth_jwt_secret or self.cfg.auth_jwt_keys_file):
            # A gateway configured for authentication never runs without it, whoever
            # built this context.
            from .auth import Authenticator

            self.auth = Authenticator.from_config(self.cfg)
