"""One configuration object for the gateway, from environment variables and a TOML file.

Every key has a typed default whose name carries its unit, an environment variable, and
a line of documentation (``voxgate gateway --help`` prints them all). Precedence: the
defaults, then the TOML file (``VOXGATE_CONFIG`` or ``--config``; keys are the field
names, e.g. ``partial_interval_ms = 250``), then the environment, then command-line
overrides. Invalid values raise ``ValueError`` naming the key and its source.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

S3_MIN_PART_SIZE_BYTES = 5 * 1024 * 1024  # S3's smallest part (all but the last)


def _key(env: str, doc: str, check: Callable[[Any], str | None] | None = None) -> Any:
    return {"env": env, "doc": doc, "check": check}


def _range(lo: float, hi: float) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if lo <= v <= hi else f"must be between {lo:g} and {hi:g}"

    return check


def _optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    def optional(v: Any) -> str | None:
        return None if v is None else check(v)

    return optional


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}"

    return check


def _one_of_int(*choices: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(map(str, choices))}"

    return check


def _url(schemes: tuple[str, ...]) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if v == "":
            return None
        parts = urlsplit(v)
        if parts.scheme not in schemes or not parts.netloc:
            return f"must be an absolute {'/'.join(schemes)} URL"
        return None

    return check


def _non_empty(v: Any) -> str | None:
    return None if v else "must not be empty"


def _no_leading_slash(v: Any) -> str | None:
    return "must not start with '/'" if v.startswith("/") else None


def _urls(v: Any) -> str | None:
    for item in v:
        problem = _url(("http", "https"))(item)
        if problem:
            return f"{item!r} {problem}"
    return None


def _min_secret(v: Any) -> str | None:
    return ("must be 32 bytes at least" if v and len(str(v).encode()) < 32 else None)


def _lang(v: Any) -> str | None:
    ok = isinstance(v, str) and 2 <= len(v) <= 8 and v.replace("-", "").isalpha()
    return None if ok else "must be a language code such as 'en'"


def _routes(v: Any) -> str | None:
    for lang, _pool in v:
        if lang != "*" and _lang(lang):
            return f"{lang!r} must be a language code or '*'"
    return None


@dataclass(frozen=True)
class GatewayConfig:
    """Gateway settings. Field names carry units; see ``describe()`` for every key."""

    host: str = field(default="127.0.0.1", metadata=_key("VOXGATE_HOST", "listen address"))
    port: int = field(default=8080, metadata=_key(
        "VOXGATE_PORT", "WebSocket listen port (0 picks a free one)", _range(0, 65535)))
    http_port: int = field(default=8081, metadata=_key(
        "VOXGATE_HTTP_PORT", "HTTP port: /records, /healthz, /readyz, /metrics",
        _range(0, 65535)))
    asr_urls: tuple[str, ...] = field(default=("http://127.0.0.1:8090",), metadata=_key(
        "ASR_URLS", "ASR service endpoints of the default pool, comma-separated", _urls))
    asr_pools: tuple[tuple[str, str], ...] = field(default=(), metadata=_key(
        "ASR_POOLS", "pool -> endpoint, e.g. 'en=http://asr-en:8090,"
        "multi=http://asr-multi:8090'; a pool routed to but not listed uses ASR_URLS"))
    asr_routes: tuple[tuple[str, str], ...] = field(
        default=(("en", "en"), ("*", "multi")), metadata=_key(
            "ASR_ROUTES", "language -> pool; '*' is every other language", _routes))
    asr_default_lang: str = field(default="en", metadata=_key(
        "ASR_DEFAULT_LANG", "language assumed until LID decides, when user_lang_pref is "
        "auto", _lang))
    asr_link_codec: str = field(default="opus", metadata=_key(
        "ASR_LINK_CODEC", "audio codec on the ASR link", _one_of("opus", "pcm")))
    asr_link_bitrate: int = field(default=20000, metadata=_key(
        "ASR_LINK_BITRATE", "Opus bitrate on the ASR link, bit/s", _range(16000, 24000)))
    asr_link_frame_ms: int = field(default=20, metadata=_key(
        "ASR_LINK_FRAME_MS", "Opus frame length on the ASR link, ms", _one_of_int(20)))
    asr_link_opus_complexity: int = field(default=2, metadata=_key(
        "ASR_LINK_OPUS_COMPLEXITY", "libopus effort of the ASR link encoder, 0..10 (2: "
        "Whisper's WER as at 5 on the test clips, at two thirds of the CPU)",
        _range(0, 10)))
    partial_interval_ms: int = field(default=250, metadata=_key(
        "PARTIAL_INTERVAL_MS", "at most one asr_partial per this many ms per session",
        _range(50, 10000)))
    flush_idle_s: float = field(default=3.0, metadata=_key(
        "FLUSH_IDLE_SEC", "no audio for this long flushes the session, s", _range(0.1, 3600)))
    lid_first_n_s: float = field(default=3.0, metadata=_key(
        "LID_FIRST_N_SECONDS", "at most this much speech is sent to language ID, s (the "
        "ASR service takes 10 s at most)", _range(0.5, 10)))
    lid_min_score: float = field(default=0.8, metadata=_key(
        "LID_MIN_SCORE", "a language ID at least this sure is final before "
        "LID_FIRST_N_SECONDS of speech", _range(0.0, 1.0)))
    # Off by default: bench/denoise_quality.py measured Whisper WER worse with RNNoise in
    # front of it on clean speech, pink noise and babble, at 6-7% of a core per session.
    enable_denoise: bool = field(default=False, metadata=_key(
        "ENABLE_DENOISE", "run RNNoise on speech before recognition (off: it raised "
        "Whisper's WER in bench/denoise_quality.py)"))
    enable_compress: bool = field(default=True, metadata=_key(
        "ENABLE_COMPRESS", "archive each session as Ogg Opus and return record_url"))
    public_base: str = field(default="", metadata=_key(
        "PUBLIC_BASE", "absolute base URL for record_url (required in production; "
        "defaults to the listen address)", _url(("http", "https"))))
    endpoint_silence_ms: int = field(default=700, metadata=_key(
        "ENDPOINT_SILENCE_MS", "silence that ends an utterance, ms", _range(100, 10000)))
    vad_min_speech_ms: int = field(default=250, metadata=_key(
        "VAD_MIN_SPEECH_MS", "speech needed before an utterance starts, ms", _range(0, 5000)))
    vad_threshold: float = field(default=0.5, metadata=_key(
        "VAD_THRESHOLD", "speech probability threshold", _range(0.05, 0.95)))
    preroll_ms: int = field(default=300, metadata=_key(
        "PREROLL_MS", "audio kept before the speech onset, ms", _range(0, 2000)))
    max_utterance_s: float = field(default=20.0, metadata=_key(
        "MAX_UTTERANCE_S", "an utterance is forced final after this long, s", _range(1, 30)))
    early_start: bool = field(default=True, metadata=_key(
        "EARLY_START", "open the recognition stream on the first speech window (with the "
        "pre-roll), VAD_MIN_SPEECH_MS before speech is confirmed; a false start is "
        "withdrawn"))
    vad_gate_dbfs: float | None = field(default=-60.0, metadata=_key(
        "VAD_GATE_DBFS", "RMS silence gate before the VAD model: a window quieter than "
        "this is silence without running the model, dBFS (-120..0, or off)",
        _optional(_range(-120.0, 0.0))))
    archive_opus_complexity: int = field(default=3, metadata=_key(
        "ARCHIVE_OPUS_COMPLEXITY", "libopus effort of the recording encoder, 0..10 (3: "
        "CELT's cost is flat from 1 to 4 and jumps at 5)", _range(0, 10)))
    max_sessions: int = field(default=200, metadata=_key(
        "MAX_SESSIONS", "sessions past this are refused with BUSY", _range(1, 100000)))
    workers: int = field(default=1, metadata=_key(
        "WORKERS", "gateway processes serving the same ports (voxgate gateway; 1: one "
        "process, no supervisor)", _range(1, 256)))
    max_frame_bytes: int = field(default=65536, metadata=_key(
        "MAX_FRAME_BYTES", "largest binary frame accepted from a client, bytes",
        _range(640, 16 * 1024 * 1024)))
    archive_dir: str = field(default="./records", metadata=_key(
        "ARCHIVE_DIR", "local archive folder (the embedded default store)"))
    archive_fallback_dir: str = field(default="", metadata=_key(
        "ARCHIVE_FALLBACK_DIR", "local folder for recordings the archive store could not "
        "take (disk full, read-only, S3 down); uploaded from there once it works again "
        "(empty: <system temp>/voxgate-archive-fallback)"))
    archive_retry_interval_s: float = field(default=5.0, metadata=_key(
        "ARCHIVE_RETRY_INTERVAL_S", "how often recordings in ARCHIVE_FALLBACK_DIR are "
        "offered to the store again, s (doubles up to 60 s while it fails)",
        _range(0.1, 3600)))
    archive_store: str = field(default="local", metadata=_key(
        "ARCHIVE_STORE", "where recordings go: local (ARCHIVE_DIR, served by the gateway) "
        "or s3 (S3-compatible object storage, /records redirects to it)",
        _one_of("local", "s3")))
    archive_spool_dir: str = field(default="", metadata=_key(
        "ARCHIVE_SPOOL_DIR", "s3 store: local folder for recordings being uploaded "
        "(empty: ARCHIVE_DIR/.spool)"))
    s3_endpoint_url: str = field(default="", metadata=_key(
        "S3_ENDPOINT_URL", "s3 store: endpoint of an S3-compatible service "
        "(empty: AWS S3 in S3_REGION)", _url(("http", "https"))))
    s3_bucket: str = field(default="", metadata=_key(
        "S3_BUCKET", "s3 store: bucket (required with ARCHIVE_STORE=s3)"))
    s3_prefix: str = field(default="records/", metadata=_key(
        "S3_PREFIX", "s3 store: object key prefix; a recording is "
        "<prefix>[<tenant>/]<flowId>.ogg",
        _no_leading_slash))
    s3_region: str = field(default="us-east-1", metadata=_key(
        "S3_REGION", "s3 store: region used for signing", _non_empty))
    s3_addressing_style: str = field(default="auto", metadata=_key(
        "S3_ADDRESSING_STYLE", "s3 store: bucket in the path or in the host name "
        "(auto: path with S3_ENDPOINT_URL, virtual on AWS)",
        _one_of("auto", "path", "virtual")))
    s3_access_key_id: str = field(default="", metadata=_key(
        "S3_ACCESS_KEY_ID", "s3 store: access key (empty: the usual AWS credential chain)"))
    # repr=False: a config printed in a log or a traceback must not show the secret.
    s3_secret_access_key: str = field(default="", repr=False, metadata=_key(
        "S3_SECRET_ACCESS_KEY", "s3 store: secret key (empty: the usual AWS credential "
        "chain)"))
    s3_part_size_bytes: int = field(default=S3_MIN_PART_SIZE_BYTES, metadata=_key(
        "S3_PART_SIZE_BYTES", "s3 store: multipart upload part size, bytes (5 MiB at least)",
        _range(S3_MIN_PART_SIZE_BYTES, 5 * 1024**3)))
    s3_presign_ttl_s: int = field(default=900, metadata=_key(
        "S3_PRESIGN_TTL_S", "s3 store: lifetime of the signed URL /records redirects to, s",
        _range(1, 7 * 24 * 3600)))
    s3_retry_deadline_s: float = field(default=12.0, metadata=_key(
        "S3_RETRY_DEADLINE_S", "s3 store: longest an upload step (a part, or the commit) "
        "is retried, s; the session waits 15 s for the commit", _range(1, 600)))
    asr_ping_interval_s: float = field(default=0.25, metadata=_key(
        "ASR_PING_INTERVAL_S", "HTTP/2 PING period on an ASR connection that carries "
        "streams, s", _range(0.05, 60)))
    asr_ping_timeout_s: float = field(default=1.5, metadata=_key(
        "ASR_PING_TIMEOUT_S", "a PING unanswered this long marks the ASR connection dead "
        "and its streams fail over, s (interval + timeout bounds stall detection)",
        _range(0.05, 60)))
    asr_final_deadline_s: float = field(default=10.0, metadata=_key(
        "ASR_FINAL_DEADLINE_S", "an utterance's final must arrive this long after its "
        "Finalize, else the stream fails over, s", _range(0.5, 300)))
    asr_failover_budget_s: float = field(default=10.0, metadata=_key(
        "ASR_FAILOVER_BUDGET_S", "how long a failed recognition stream is retried (with "
        "backoff, on any endpoint of its pool) before its utterances are given up, s",
        _range(0, 300)))
    asr_breaker_open_s: float = field(default=1.0, metadata=_key(
        "ASR_BREAKER_OPEN_S", "an ASR endpoint that failed gets no new stream for this "
        "long, then one probe (half-open); doubles up to 8x while probes fail, s",
        _range(0.05, 300)))
    resume_window_s: float = field(default=10.0, metadata=_key(
        "RESUME_WINDOW_S", "a seq_header client that disconnects may reconnect with the "
        "same flowId this long and continue its session, s (0: no resume)",
        _range(0, 3600)))
    shutdown_grace_s: float = field(default=20.0, metadata=_key(
        "SHUTDOWN_GRACE_S", "on SIGTERM, sessions get this long to finish their finals; "
        "then they are cancelled, and their recordings are still committed, s",
        _range(0, 3600)))
    # repr=False on every secret: a config printed in a log must not show it.
    auth_jwt_secret: str = field(default="", repr=False, metadata=_key(
        "AUTH_JWT_SECRET", "HS256 secret, 32 bytes at least; when set, start.auth.token "
        "must be a valid JWT", _min_secret))
    auth_jwt_keys_file: str = field(default="", metadata=_key(
        "AUTH_JWT_KEYS_FILE", "JSON Web Key Set of the token issuers' keys (RS256, ES256, "
        "HS256), chosen by the token's kid; reread when the file changes (key rotation)"))
    auth_jwt_issuer: str = field(default="", metadata=_key(
        "AUTH_JWT_ISSUER", "when set, a token's iss must equal it"))
    auth_jwt_audience: str = field(default="", metadata=_key(
        "AUTH_JWT_AUDIENCE", "when set, a token's aud must contain it"))
    auth_jwt_leeway_s: float = field(default=30.0, metadata=_key(
        "AUTH_JWT_LEEWAY_S", "clock skew allowed on exp, nbf and iat, s", _range(0, 600)))
    auth_disabled: bool = field(default=False, metadata=_key(
        "AUTH_DISABLED", "run without authentication on a non-loopback address (without "
        "it, voxgate gateway refuses to start there with no AUTH_JWT_SECRET or "
        "AUTH_JWT_KEYS_FILE)"))
    records_url_key: str = field(default="", repr=False, metadata=_key(
        "RECORDS_URL_KEY", "HMAC key that signs record_url, 32 bytes at least (empty: a "
        "random key per process; links then die with the process and differ between "
        "replicas)", _min_secret))
    records_url_ttl_s: int = field(default=3600, metadata=_key(
        "RECORDS_URL_TTL_S", "lifetime of a signed record_url, s", _range(1, 30 * 24 * 3600)))
    metrics_port: int | None = field(default=None, metadata=_key(
        "METRICS_PORT", "serve /metrics on this port alone, not on VOXGATE_HTTP_PORT "
        "(off: on VOXGATE_HTTP_PORT; 0 picks a free one)",
        _optional(_range(0, 65535))))
    tls_cert_file: str = field(default="", metadata=_key(
        "TLS_CERT_FILE", "PEM certificate chain: the gateway serves wss:// and https:// "
        "(with TLS_KEY_FILE)"))
    tls_key_file: str = field(default="", metadata=_key(
        "TLS_KEY_FILE", "PEM private key of TLS_CERT_FILE"))
    asr_tls_ca_file: str = field(default="", metadata=_key(
        "ASR_TLS_CA_FILE", "CA bundle that https:// ASR endpoints are verified against "
        "(empty: the system trust store)"))
    asr_tls_cert_file: str = field(default="", metadata=_key(
        "ASR_TLS_CERT_FILE", "client certificate the gateway presents to the ASR service "
        "(mTLS, with ASR_TLS_KEY_FILE)"))
    asr_tls_key_file: str = field(default="", metadata=_key(
        "ASR_TLS_KEY_FILE", "private key of ASR_TLS_CERT_FILE"))
    asr_token: str = field(default="", repr=False, metadata=_key(
        "ASR_TOKEN", "bearer token sent to the ASR service on every request (where mTLS "
        "is not used), 32 bytes at least", _min_secret))
    start_timeout_s: float = field(default=10.0, metadata=_key(
        "START_TIMEOUT_S", "a connection that sends no valid start this long is closed "
        "with START_TIMEOUT, s", _range(0.1, 600)))
    send_timeout_s: float = field(default=10.0, metadata=_key(
        "SEND_TIMEOUT_S", "a send or a close to a client that takes longer is abandoned "
        "and the connection aborted, s", _range(0.1, 600)))
    max_connections: int = field(default=1000, metadata=_key(
        "MAX_CONNECTIONS", "open WebSocket connections (admitted or not) past this are "
        "refused at the handshake with 503", _range(1, 1000000)))
    max_sessions_per_ip: int = field(default=0, metadata=_key(
        "MAX_SESSIONS_PER_IP", "connections from one client address past this get "
        "RATE_LIMITED (0: no cap; behind a proxy every client has its address)",
        _range(0, 1000000)))
    max_sessions_per_tenant: int = field(default=0, metadata=_key(
        "MAX_SESSIONS_PER_TENANT", "sessions of one tenant past this get RATE_LIMITED "
        "(0: no cap)", _range(0, 1000000)))
    max_messages_per_s: float = field(default=1000.0, metadata=_key(
        "MAX_MESSAGES_PER_S", "WebSocket messages a session may send per second "
        "(averaged over 2 s); a faster client is read at this rate (TCP backpressure, "
        "nothing dropped) and told with a non-fatal RATE_LIMITED", _range(1, 1000000)))
    max_session_s: float = field(default=14400.0, metadata=_key(
        "MAX_SESSION_S", "a session is ended (reason max_duration) after this long, s",
        _range(1, 7 * 24 * 3600)))

    def __post_init__(self) -> None:
        for f in fields(self):
            check = f.metadata.get("check")
            problem = check(getattr(self, f.name)) if check else None
            if problem:
                raise ValueError(f"{f.metadata['env']} ({f.name}) {problem}")
        if self.archive_store == "s3" and not self.s3_bucket:
            raise ValueError("S3_BUCKET (s3_bucket) is required when ARCHIVE_STORE is s3")
        for cert, key, names in (
                (self.tls_cert_file, self.tls_key_file, "TLS_CERT_FILE and TLS_KEY_FILE"),
                (self.asr_tls_cert_file, self.asr_tls_key_file,
                 "ASR_TLS_CERT_FILE and ASR_TLS_KEY_FILE")):
            if bool(cert) != bool(key):
                raise ValueError(f"{names} must be set together")
        if bool(self.s3_access_key_id) != bool(self.s3_secret_access_key):
            raise ValueError("S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY must be set together "
                             "(or both left empty for the AWS credential chain)")

    @classmethod
    def load(
        cls,
        *,
        env: Mapping[str, str] | None = None,
        file: str | Path | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> GatewayConfig:
        """Build the config from defaults, a TOML file, the environment and overrides.

        Args:
            env: environment to read (default ``os.environ``).
            file: TOML file; default ``$VOXGATE_CONFIG`` if set.
            overrides: field values that win over everything (command-line flags).

        Raises:
            ValueError: an unknown key, an unparsable value or a value out of range.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        by_name = {f.name: f for f in fields(cls)}
        file = file or env.get("VOXGATE_CONFIG") or None
        if file:
            with open(file, "rb") as fh:
                data = tomllib.load(fh)
            for key, raw in data.items():
                if key not in by_name:
                    raise ValueError(f"{file}: unknown key {key!r}")
                values[key] = _coerce(by_name[key], raw, f"{file}: {key}")
        for f in fields(cls):
            name = f.metadata["env"]
            if name in env:
                values[f.name] = _coerce(f, env[name], name)
        for key, raw in (overrides or {}).items():
            if raw is None:
                continue
            if key not in by_name:
                raise ValueError(f"unknown setting {key!r}")
            values[key] = _coerce(by_name[key], raw, key)
        return cls(**values)

    def pool_urls(self) -> dict[str, tuple[str, ...]]:
        """Pool name -> endpoints. ``default`` and every pool named in ``asr_routes`` but
        not in ``asr_pools`` use ``asr_urls``."""
        pools: dict[str, list[str]] = {"default": list(self.asr_urls)}
        for name, url in self.asr_pools:
            pools.setdefault(name, []).append(url)
        for _lang_code, name in self.asr_routes:
            pools.setdefault(name, list(self.asr_urls))
        return {k: tuple(v) for k, v in pools.items()}

    def route(self, lang: str) -> str:
        """The pool that recognizes ``lang`` (``default`` when no route names it)."""
        routes = dict(self.asr_routes)
        base = lang.split("-", 1)[0].lower()
        return routes.get(lang, routes.get(base, routes.get("*", "default")))

    @classmethod
    def describe(cls) -> str:
        """One line per key: environment variable, default and meaning."""
        lines = []
        for f in fields(cls):
            default = "off" if f.default is None else f.default
            if isinstance(default, tuple):
                default = ",".join(x if isinstance(x, str) else "=".join(x) for x in default)
            lines.append(f"  {f.metadata['env']:<22} {f.metadata['doc']} [{default}]")
        return "\n".join(lines)

    def replace(self, **changes: Any) -> GatewayConfig:
        return dataclasses.replace(self, **changes)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(f: dataclasses.Field[Any], raw: Any, source: str) -> Any:
    """Parse ``raw`` (a string from the environment, or a TOML value) to the field type."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError("expected true or false")
        if kind == "int":
            if isinstance(raw, bool):
                raise ValueError("expected an integer")
            return int(raw)
        if kind == "float | None":
            if raw is None or str(raw).strip().lower() in ("off", "none", ""):
                return None
            if isinstance(raw, bool):
                raise ValueError("expected a number or off")
            return float(raw)
        if kind == "int | None":
            if raw is None or str(raw).strip().lower() in ("off", "none", ""):
                return None
            if isinstance(raw, bool):
                raise ValueError("expected an integer or empty")
            return int(raw)
        if kind == "float":
            if isinstance(raw, bool):
                raise ValueError("expected a number")
            return float(raw)
        if kind == "str":
            return str(raw)
        if kind == "tuple[str, ...]":
            items = raw if isinstance(raw, list) else str(raw).split(",")
            return tuple(str(x).strip() for x in items if str(x).strip())
        if kind == "tuple[tuple[str, str], ...]":
            pairs = raw.items() if isinstance(raw, dict) else (
                item.split("=", 1) for item in str(raw).split(",") if item.strip()
            )
            out = []
            for pair in pairs:
                name, url = (str(x).strip() for x in pair)
                if not name or not url:
                    raise ValueError("expected name=url pairs")
                out.append((name, url))
            return tuple(out)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: cannot parse {raw!r}: {exc}") from exc
    raise TypeError(f"no parser for {f.name}: {kind}")
