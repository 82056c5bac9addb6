"""The ``voxgate`` command line.

Each subcommand imports its implementation lazily, so ``voxgate --help`` stays fast and
a command never pays for another's dependencies.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

MODEL_NAMES = ("base", "tiny.en")



def _asr_knobs() -> str:
    """Every [server] and [pools.<name>] key of the ASR config with its default (the
    reasons for the defaults are in docs/operations.md section 4)."""
    import dataclasses

    from asr.engine import PoolSpec
    from asr.server import AsrServerConfig

    def keys(cls: type) -> str:
        out = []
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out.append(f"{f.name}={f.default!r}")
            elif f.default_factory is not dataclasses.MISSING:
                out.append(f"{f.name}={f.default_factory()!r}")
            else:
                out.append(f.name)
        return ", ".join(out)

    return (f"[server] keys (defaults): {keys(AsrServerConfig)}. [pools.<name>] keys "
            f"(defaults): {keys(PoolSpec)}. docs/operations.md section 4 gives each "
            "one's meaning and the measurement behind its default.")

def _models(args: argparse.Namespace) -> int:
    from asr.whisper import cache

    if args.action == "prepare":
        names = args.model or list(MODEL_NAMES)
        for name in names:
            for precision in args.precision or ["int8"]:
                prepared = cache.prepare(name, precision)
                print(f"{name} {precision}: {prepared.dir}")
        return 0
    if args.action == "path":
        from asr.whisper import weights

        print(weights.cache_root())
        return 0
    raise AssertionError(args.action)  # argparse restricts the choices


def _transcribe(args: argparse.Namespace) -> int:
    from asr.whisper.transcribe import transcribe_file

    result = transcribe_file(Path(args.file), model=args.model, beam=args.beam,
                             language=args.language, prompt=args.prompt)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        print(result.text)
    return 0


def _asr(args: argparse.Namespace) -> int:
    from asr.main import main

    return main(args.config, args.host, args.port, workers=args.workers,
                worker_threads=args.worker_threads, standby_workers=args.standby_workers,
                job_timeout_s=args.job_timeout_s, log_level=args.log_level,
                log_format=args.log_format,
                server={"certfile": args.tls_cert_file, "keyfile": args.tls_key_file,
                        "client_ca_file": args.client_ca_file})


def _gateway(args: argparse.Namespace) -> int:
    from gateway.main import gateway_main

    return gateway_main(args)


def _serve(args: argparse.Namespace) -> int:
    from gateway.main import serve_main

    return serve_main(args)


def _stream(args: argparse.Namespace) -> int:
    from gateway.stream_cli import stream_main

    return stream_main(args)


def _version() -> str:
    """The installed distribution's version, so a bug report names the exact build."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("voxgate")
    except PackageNotFoundError:  # run from a tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voxgate", description="voxgate: a real-time speech gateway"
    )
    parser.add_argument("--version", action="version", version=f"voxgate {_version()}",
                        help="print the installed package's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = sub.add_parser(
        "models", help="prepare the ONNX models from the packaged Whisper weights"
    )
    models.add_argument("action", choices=["prepare", "path"],
                        help="prepare: export and cache now; path: print the cache folder")
    models.add_argument("--model", action="append", choices=MODEL_NAMES,
                        help="model to prepare (repeatable; default: all)")
    models.add_argument("--precision", action="append", choices=["int8", "fp32"],
                        help="precision to prepare (repeatable; default: int8)")
    models.set_defaults(func=_models)

    from asr.workers import WorkerConfig

    wdef = WorkerConfig()
    asr = sub.add_parser(
        "asr", help="run the ASR service (HTTP/2, link v1-v3)",
        epilog=_asr_knobs(),
        description="Run the ASR service: POST /v1/recognize (link v1-v3), POST /v1/lid, "
        "/healthz, /readyz, /metrics. SIGINT/SIGTERM drain in-flight streams. The TOML "
        "file holds [server] settings (AsrServerConfig fields), [workers] settings (the "
        "worker options below, plus job_timeout_per_audio_s, start_timeout_s, "
        "crash_loop_restarts, crash_loop_window_s), default = \"<pool>\" and "
        "[pools.<name>] tables (model, languages, partial_model, partial_window_s, "
        "final_window_s, precision, beam_size). Options given here win over the file.")
    asr.add_argument("--host", help="listen address (default 127.0.0.1)")
    asr.add_argument("--port", type=int, help="listen port (default 8090)")
    asr.add_argument("--config", help="TOML file: [server], [workers] and [pools.*]")
    asr.add_argument("--workers", type=int, metavar="N",
                     help="inference worker processes running batches at once; 0 runs "
                     f"the models in the server process (default {wdef.workers})")
    asr.add_argument("--worker-threads", type=int, metavar="T",
                     help="onnxruntime threads per worker, or in-process with --workers 0 "
                     f"(default {wdef.worker_threads})")
    asr.add_argument("--standby-workers", type=int, metavar="N",
                     help="extra warm worker processes that take over at once when one "
                     f"crashes; each costs one set of models in RAM "
                     f"(default {wdef.standby_workers})")
    asr.add_argument("--job-timeout-s", type=float, metavar="S",
                     help="a batch's deadline is S plus job_timeout_per_audio_s "
                     f"({wdef.job_timeout_per_audio_s:g}) per second of its audio; past it "
                     f"the worker is killed and replaced (default {wdef.job_timeout_s:g})")
    asr.add_argument("--tls-cert-file", metavar="PEM",
                     help="serve TLS (ALPN h2) with this certificate chain "
                     "([server] certfile)")
    asr.add_argument("--tls-key-file", metavar="PEM",
                     help="private key of --tls-cert-file ([server] keyfile)")
    asr.add_argument("--client-ca-file", metavar="PEM",
                     help="require client certificates signed by this CA: mTLS "
                     "([server] client_ca_file). The bearer token alternative is the "
                     "ASR_TOKEN environment variable (no flag: ps would show it)")
    asr.add_argument("--log-level", default="info",
                     choices=["debug", "info", "warning", "error"],
                     help="log level of the service and its workers (default info)")
    asr.add_argument("--log-format", default="json", choices=["json", "text"],
                     help="json: one object a line with flowId, stage, latency_ms, ... "
                     "(default); text: for a person at a terminal")
    asr.set_defaults(func=_asr)

    from gateway.config import GatewayConfig

    settings = ("settings (environment variables; a TOML file given with --config or "
                "VOXGATE_CONFIG uses the lower-case field names):\n" + GatewayConfig.describe())
    for name, helptext, func in (
        ("gateway", "run the gateway alone (WebSocket /ws/stream, HTTP side)", _gateway),
        ("serve", "the embedded default: gateway plus a local ASR service, bundled models, "
         "local archive", _serve),
    ):
        p = sub.add_parser(name, help=helptext, description=helptext, epilog=settings,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--host", help="listen address (default 127.0.0.1); an address "
                       "that is not loopback needs AUTH_JWT_SECRET or AUTH_JWT_KEYS_FILE, "
                       "or AUTH_DISABLED=true")
        p.add_argument("--port", type=int, help="WebSocket port (default 8080)")
        p.add_argument("--http-port", type=int, help="HTTP port (default 8081)")
        p.add_argument("--config", help="TOML file with settings")
        if name == "gateway":
            p.add_argument("--workers", type=int, metavar="N",
                           help="gateway processes serving the same ports, under a "
                           "supervisor that restarts them; 1 is one process and no "
                           "supervisor: WORKERS (default 1)")
        quiet = name == "serve"  # the embedded default is for a person at a terminal
        p.add_argument("--log-level", default="warning" if quiet else "info",
                       choices=["debug", "info", "warning", "error"],
                       help=f"log level (default {'warning' if quiet else 'info'})")
        p.add_argument("--log-format", default="json", choices=["json", "text"],
                       help="json: one object a line with flowId, stage, latency_ms, "
                       "trace_id, ... (default); text: for a person at a terminal")
        p.set_defaults(func=func)

    st = sub.add_parser(
        "stream", help="stream a WAV file (or raw PCM16 from stdin) and print results",
        description="Stream audio to a gateway with the client SDK and print partials, "
        "finals, the language, the recording and the metrics. A dropped connection is "
        "resumed. Example: sox talk.mp3 -t raw -r 16000 -e signed -b 16 -c 1 - | "
        "voxgate stream -")
    st.add_argument("file", help="WAV file (PCM16, any rate, mono or stereo), or - for raw "
                    "PCM16 LE mono on standard input")
    st.add_argument("--url", default="ws://127.0.0.1:8080/ws/stream")
    st.add_argument("--realtime", dest="realtime", action="store_true", default=True,
                    help="pace the audio in real time (default)")
    st.add_argument("--fast", dest="realtime", action="store_false",
                    help="send as fast as the server's flow control allows")
    st.add_argument("--rate", type=int, default=16000,
                    help="sample rate of raw audio on stdin, Hz (default 16000)")
    st.add_argument("--lang", default="auto", help="user_lang_pref hint (default auto)")
    st.add_argument("--flow-id", help="flowId for the session (default: server-made)")
    st.add_argument("--token", help="JWT for a gateway with auth")
    st.add_argument("--json", action="store_true", help="print every event as a JSON line")
    st.set_defaults(func=_stream)

    tr = sub.add_parser("transcribe", help="transcribe a 16 kHz mono WAV file")
    tr.add_argument("file", help="WAV file (PCM16; other rates are resampled)")
    tr.add_argument("--model", default="base", choices=MODEL_NAMES)
    tr.add_argument("--beam", type=int, default=1, choices=range(1, 6), metavar="N",
                    help="beam size, 1 (greedy) to 5")
    tr.add_argument("--language", help="language code (default: detect)")
    tr.add_argument("--prompt", help="initial prompt / hotwords")
    tr.add_argument("--json", action="store_true",
                    help="print JSON with language, timing and RTF")
    tr.set_defaults(func=_transcribe)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"voxgate {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
