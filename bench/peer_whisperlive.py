"""WhisperLive, the streaming peer of ``bench/e2e_latency.py``: setup and server launcher.

WhisperLive (``whisper-live`` on the package index, MIT) is a real-time Whisper server:
clients send audio over a WebSocket and get growing segments back. Its faster-whisper
backend runs CTranslate2, so it can read the very weights voxgate exports to ONNX
(``asr/whisper/weights.py``): the comparison is then about the streaming design, not the
model.

It lives in its own virtual environment, outside the repository, because its
dependencies (CTranslate2, the Rust-based ``tokenizers``) must never enter voxgate's:

    .venv/bin/python bench/peer_whisperlive.py setup      # once, about a minute

``setup`` installs ``whisper-live`` with ``--no-deps`` and then only what its WebSocket
server path with the faster-whisper backend imports (the list below, the same pins as
the ``peer`` extra in pyproject.toml). Its declared dependencies also pull torch,
torchaudio, the CUDA libraries, OpenVINO and openai-whisper, none of which that path
uses on a CPU: torch is imported only to ask ``torch.cuda.is_available()`` (and by the
TensorRT-only server VAD), so the launcher below registers a tiny ``torch`` module
that answers "no GPU" and nothing else.

    <peer venv>/bin/python bench/peer_whisperlive.py serve --port P --model-dir D

``serve`` runs under the peer environment; the bench starts it and waits for the port.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import types
from pathlib import Path

# Pins: whisper-live 0.10.0 declares faster-whisper==1.2.0 and tokenizers==0.20.3.
WHISPER_LIVE = "whisper-live==0.10.0"
PEER_DEPS = (
    "faster-whisper==1.2.0",  # pulls ctranslate2, av, onnxruntime, huggingface_hub, tqdm
    "tokenizers==0.20.3",
    "websockets>=13",
    "fastapi>=0.110",  # imported at module level by whisper_live.server
    "uvicorn>=0.29",
)
PEER_VENV = Path(os.environ.get("VOXGATE_PEER_VENV",
                                Path.home() / ".cache" / "voxgate" / "peer-venv"))


def peer_python() -> Path:
    """The interpreter of the peer environment (it may not exist yet)."""
    return PEER_VENV / "bin" / "python"


def setup() -> int:
    """Create the peer environment and install WhisperLive without torch or GPU wheels."""
    py = peer_python()
    if not py.exists():
        # A plain venv from the same base interpreter as voxgate's.
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(PEER_VENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *PEER_DEPS], check=True)
    subprocess.run([*pip, "--no-deps", WHISPER_LIVE], check=True)
    subprocess.run([str(py), "-c", "import faster_whisper, whisper_live, websockets"],
                   check=True)
    print(f"peer environment ready: {py}")
    return 0


def prepare_model_dir(model: str, workdir: Path) -> Path:
    """One directory with the CTranslate2 files faster-whisper wants for *model*.

    Runs under voxgate's environment: ``asr.whisper.weights`` finds (and for base,
    joins) the packaged weights and checks their sha256; the side files sit in another
    directory, so everything is linked into one place. faster-whisper needs
    ``model.bin``, ``config.json``, ``vocabulary.txt`` and ``tokenizer.json`` (without
    the last it would fetch a tokenizer from a hub); ``preprocessor_config.json`` is
    optional and its defaults are Whisper's 80-bin mel.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from asr.whisper import weights

    files = weights.model_files(model)
    d = workdir / f"whisper-{model.replace('.', '-')}-ct2"
    d.mkdir(parents=True, exist_ok=True)
    for name, src in (("model.bin", files.model_bin), ("config.json", files.config_json),
                      ("tokenizer.json", files.tokenizer_json),
                      ("vocabulary.txt", files.vocabulary_txt)):
        link = d / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(src)
    return d


def _no_gpu_torch() -> None:
    """Register a ``torch`` module that only says there is no CUDA device.

    WhisperLive's faster-whisper path touches torch for that question alone (its torch
    VAD serves the TensorRT backend); installing torch for it would cost 700 MB+.
    """
    torch = types.ModuleType("torch")
    cuda = types.ModuleType("torch.cuda")
    cuda.is_available = lambda: False  # type: ignore[attr-defined]
    torch.cuda = cuda  # type: ignore[attr-defined]
    sys.modules["torch"] = torch
    sys.modules["torch.cuda"] = cuda


def serve(port: int, model_dir: str, max_clients: int) -> None:
    """Run WhisperLive's WebSocket server on 127.0.0.1 with one shared model."""
    _no_gpu_torch()
    import logging

    from whisper_live.server import TranscriptionServer

    logging.basicConfig(level=logging.WARNING)
    print(f"whisperlive: serving on 127.0.0.1:{port}", flush=True)
    TranscriptionServer().run(
        "127.0.0.1", port=port, backend="faster_whisper",
        faster_whisper_custom_model_path=model_dir,
        single_model=True,  # one model for every client, as voxgate's ASR service does
        max_clients=max_clients, max_connection_time=24 * 3600,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("setup", help="create the peer environment")
    s = sub.add_parser("serve", help="run the WhisperLive server (under the peer venv)")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--model-dir", required=True,
                   help="CTranslate2 Whisper directory (model.bin, config.json, "
                        "tokenizer.json, vocabulary.txt)")
    s.add_argument("--max-clients", type=int, default=64)
    args = ap.parse_args()
    if args.cmd == "setup":
        return setup()
    serve(args.port, args.model_dir, args.max_clients)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
