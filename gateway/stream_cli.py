"""``voxgate stream``: a thin command over the client SDK (``voxgate_client``).

Streams a WAV file (any rate, mono or stereo: the SDK converts) or raw PCM16 LE mono from
standard input (``sox in.mp3 -t raw -r 16000 -e signed -b 16 -c 1 - | voxgate stream -``)
and prints partials, finals, the language, the recording's URL and the metrics. The
session reconnects and resumes by itself if the connection drops.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

CHUNK_MS = 20


def format_event(e: Any) -> str | None:
    """One line for a human, or None for events not worth a line."""
    import voxgate_client as vc

    if isinstance(e, vc.Partial):
        return f"  … [{_ts(e.start_ms)}] {e.text}"
    if isinstance(e, vc.Final):
        return f"  ✔ [{_ts(e.start_ms)}-{_ts(e.end_ms)}] ({e.lang}) {e.text}"
    if isinstance(e, vc.Lid):
        speech_ms = e.extra.get("speech_ms", 0)
        pool = f", recognized on pool {e.pool}" if e.pool else ""
        return f"  language: {e.lang} ({e.score:.2f} on {speech_ms / 1000:.1f} s of speech{pool})"
    if isinstance(e, vc.RecordUrl):
        return f"  recording: {e.url} ({e.duration_ms / 1000:.1f} s, {e.bytes} B)"
    if isinstance(e, vc.Error):
        return f"  error {e.code}: {e.message}"
    if isinstance(e, vc.Flow):
        return f"  flow: {e.state}"
    if isinstance(e, vc.Metrics):
        fp = e.first_partial_ms
        return (f"  metrics: audio {e.audio_ms / 1000:.1f} s, speech {e.speech_ms / 1000:.1f} s, "
                f"{e.utterances} utterance(s)"
                + (f", first partial {fp} ms" if fp is not None else ""))
    if isinstance(e, vc.Reconnecting):
        return f"  reconnecting (attempt {e.attempt}): {e.cause}"
    if isinstance(e, vc.Reconnected):
        return f"  reconnected ({'session resumed' if e.resumed else 'new session'})"
    if isinstance(e, vc.End):
        return f"  end ({e.reason})"
    return None


def _ts(ms: float) -> str:
    return f"{int(ms // 60000):02d}:{(ms % 60000) / 1000:05.2f}"


def _printer(as_json: bool) -> Callable[[Any], None]:
    import dataclasses

    import voxgate_client as vc

    tty = sys.stdout.isatty() and not as_json
    last = {"len": 0}

    def show(event: Any) -> None:
        if as_json:
            body = {k: v for k, v in dataclasses.asdict(event).items() if k != "extra"}
            print(json.dumps({"event": type(event).__name__, **body, **event.extra}),
                  flush=True)
            return
        line = format_event(event)
        if line is None:
            return
        if isinstance(event, vc.Partial) and tty:
            print("\r" + line + " " * max(0, last["len"] - len(line)), end="", flush=True)
            last["len"] = len(line)
            return
        if tty and last["len"]:
            print("\r" + " " * last["len"] + "\r", end="")
            last["len"] = 0
        print(line, flush=True)

    return show


def stream_main(args: Any) -> int:
    """Run ``voxgate stream``; exit status 1 on a fatal error or no ``end``."""
    try:
        import anyio
        import voxgate_client as vc
    except ImportError:
        print("voxgate stream needs the client SDK: pip install ./clients/python",
              file=sys.stderr)
        return 2
    show = _printer(args.json)
    options: dict[str, Any] = {"lang": args.lang}
    if args.flow_id:
        options["flow_id"] = args.flow_id
    if args.token:
        options["token"] = args.token
    finals: list[str] = []
    failed: list[str] = []

    def on_event(event: Any) -> None:
        show(event)
        if isinstance(event, vc.Final) and event.text:
            finals.append(event.text)
        if isinstance(event, vc.Error) and event.fatal:
            failed.append(event.code)

    async def run() -> list[Any]:
        if args.file == "-":
            return await _stream_stdin(args.url, sys.stdin.buffer, args.rate, args.realtime,
                                       on_event, options)
        events: list[Any] = await vc.stream_file(args.url, args.file, realtime=args.realtime,
                                                 on_event=on_event, **options)
        return events

    try:
        events = anyio.run(run)
    except vc.StreamError as exc:
        print(f"voxgate stream: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"voxgate stream: {exc}", file=sys.stderr)
        return 1
    if not args.json:
        print(" ".join(finals).strip())
    ended = bool(events) and isinstance(events[-1], vc.End)
    return 1 if failed or not ended else 0


async def _stream_stdin(url: str, stdin: BinaryIO, rate: int, realtime: bool,
                        on_event: Callable[[Any], None], options: dict[str, Any]
                        ) -> list[Any]:
    """Raw PCM16 LE mono at ``rate`` from ``stdin`` until EOF."""
    import anyio
    import voxgate_client as vc

    step = rate * CHUNK_MS // 1000 * 2
    events: list[Any] = []
    async with vc.connect(url, sample_rate=rate, **options) as s:

        async def produce() -> None:
            t0 = anyio.current_time()
            sent = 0
            carry = b""
            while True:
                data = await anyio.to_thread.run_sync(stdin.read, step)
                if not data:
                    break
                data, carry = (carry + data), b""
                if len(data) % 2:
                    data, carry = data[:-1], data[-1:]
                await s.send(data)
                sent += len(data) // 2
                if realtime:  # a live source is already paced; a file piped in is not
                    await anyio.sleep_until(t0 + sent / rate)
            await s.flush()

        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            async for event in s:
                events.append(event)
                on_event(event)
    return events
