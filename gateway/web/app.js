// voxgate browser client: microphone -> AudioWorklet (16 kHz PCM16, 20 ms) -> WebSocket
// with the seq_header feature -> live partials, finals, language, recording link.
//
// Query parameters: ws (the stream URL; default: this host, the gateway's WebSocket port
// or 8080, /ws/stream),
// lang (user_lang_pref, default "auto"), ctx (AudioContext rate: default 16000; any
// other value, e.g. 48000, makes the worklet resample), flow (a flowId).

const FRAME_MS = 20;
const KEEP_FRAMES = 1500; // the last 30 s, re-sent from the server's next_seq on resume
const MAX_BUFFERED_BYTES = 256 * 1024; // hold frames while the socket is this far behind
const RESUME_WINDOW_MS = 10000; // the gateway's RESUME_WINDOW_S default
const RETRY_MS = [250, 500, 1000, 2000];

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);

// The gateway fills in its WebSocket port when it knows it; 8080 is the default port.
function defaultWsUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const host = location.hostname.includes(":") ? `[${location.hostname}]` : location.hostname;
  const port = document.querySelector('meta[name="voxgate-ws-port"]')?.content || "8080";
  return `${scheme}//${host}:${port}/ws/stream`;
}

function newFlowId() {
  const rnd = new Uint8Array(8);
  crypto.getRandomValues(rnd);
  return "web-" + Array.from(rnd, (b) => b.toString(16).padStart(2, "0")).join("");
}

const ui = {
  state(s, detail = "") {
    document.body.dataset.state = s;
    $("state").textContent = detail ? `${s}: ${detail}` : s;
  },
  error(code, message) {
    const li = document.createElement("li");
    li.className = "error";
    li.dataset.code = code;
    li.textContent = `${code}: ${message}`;
    $("errors").append(li);
  },
  utterance(ev, final) {
    let el = document.querySelector(`#transcript [data-utterance="${ev.utterance}"]`);
    if (!el) {
      el = document.createElement("p");
      el.dataset.utterance = String(ev.utterance);
      // keep utterances in index order even if events come back after a resume
      const later = Array.from($("transcript").children)
        .find((p) => Number(p.dataset.utterance) > ev.utterance);
      $("transcript").insertBefore(el, later || null);
    }
    if (el.classList.contains("final") && !final) return; // a late partial never undoes
    el.className = final ? "final" : "partial";
    el.textContent = ev.text;
    el.title = `${(ev.start_ms / 1000).toFixed(2)}-${(ev.end_ms / 1000).toFixed(2)} s, ${ev.lang}`;
  },
  level(peak) {
    const db = peak > 0 ? 20 * Math.log10(peak) : -60;
    $("level").value = Math.max(-60, db);
  },
};

class Streamer {
  constructor() {
    this.url = params.get("ws") || defaultWsUrl();
    this.lang = params.get("lang") || "auto";
    this.flowId = params.get("flow") || newFlowId();
    // The JWT for a gateway with authentication. Typed into the page, never taken from
    // the URL (which servers and proxies log); kept in memory only, for resumes.
    this.token = $("token").value.trim();
    this.frames = []; // [seq, ArrayBuffer] of the last KEEP_FRAMES frames
    this.nextSeq = 0; // seq of the next captured frame
    this.sendSeq = 0; // seq of the next frame to send
    this.paused = false; // flow PAUSE until RESUME
    this.stopping = false; // stop pressed: send what is held, then flush
    this.flushed = false;
    this.ended = false;
    this.fatal = ""; // the code of a fatal error event
    this.ws = null;
    this.acked = false;
    this.seen = new Set(); // event seqs already handled (a resume may send some again)
    this.lostAt = 0; // when the connection dropped (for the resume window)
    this.retries = 0;
    this.dropped = 0; // frames that fell out of the buffer before they could be sent
    window.voxgate = this; // for the browser test and for curious users
    this.events = [];
  }

  async start() {
    ui.state("starting");
    this.media = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false,
               autoGainControl: false },
    });
    const rate = Number(params.get("ctx") || 16000);
    this.ctx = new AudioContext({ sampleRate: rate });
    await this.ctx.audioWorklet.addModule("/web/capture-worklet.js");
    const src = this.ctx.createMediaStreamSource(this.media);
    this.node = new AudioWorkletNode(this.ctx, "pcm16-capture",
                                     { numberOfInputs: 1, numberOfOutputs: 1,
                                       channelCount: 1, channelCountMode: "explicit" });
    this.node.port.onmessage = (m) => this.onChunk(m.data);
    // A silent sink keeps the graph pulling the worklet; nothing is played back.
    const mute = this.ctx.createGain();
    mute.gain.value = 0;
    src.connect(this.node).connect(mute).connect(this.ctx.destination);
    $("rate").textContent = `${this.ctx.sampleRate} Hz` +
      (this.ctx.sampleRate === 16000 ? "" : " (resampled to 16000 Hz)");
    $("flow").textContent = this.flowId;
    this.connect();
  }

  stopCapture() {
    if (this.media) this.media.getTracks().forEach((t) => t.stop());
    if (this.ctx) this.ctx.close();
    this.media = this.ctx = null;
  }

  // The session is over (end, a fatal error, or the resume window ran out).
  finish() {
    this.ended = true;
    this.stopCapture();
    $("start").disabled = false;
    $("stop").disabled = true;
  }

  stop() {
    this.stopping = true;
    this.stopCapture();
    ui.state("finishing");
    this.pump();
  }

  onChunk({ pcm, peak }) {
    ui.level(peak);
    if (this.stopping) return;
    const seq = this.nextSeq++;
    const frame = new ArrayBuffer(8 + pcm.byteLength);
    const head = new DataView(frame);
    head.setUint32(0, seq, true);
    head.setUint32(4, (seq * FRAME_MS) >>> 0, true); // pts_ms
    new Uint8Array(frame, 8).set(new Uint8Array(pcm));
    this.frames.push([seq, frame]);
    if (this.frames.length > KEEP_FRAMES) {
      const [old] = this.frames.shift();
      if (old >= this.sendSeq) { // never sent: that audio is lost
        this.dropped++;
        this.sendSeq = old + 1;
        $("dropped").textContent = `${this.dropped * FRAME_MS} ms of audio dropped`;
      }
    }
    this.pump();
  }

  // Send held frames while the socket is open, acked, not paused and not backed up;
  // after a stop, send the flush once everything captured has gone out.
  pump() {
    const ws = this.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN || !this.acked || this.paused) return;
    const first = this.frames.length ? this.frames[0][0] : this.nextSeq;
    let i = Math.max(0, this.sendSeq - first);
    while (i < this.frames.length && ws.bufferedAmount < MAX_BUFFERED_BYTES) {
      ws.send(this.frames[i][1]);
      this.sendSeq = this.frames[i][0] + 1;
      i++;
    }
    if (i < this.frames.length) { // backed up: try again once the socket drained a bit
      setTimeout(() => this.pump(), FRAME_MS);
      return;
    }
    if (this.stopping && !this.flushed && this.sendSeq >= this.nextSeq) {
      ws.send(JSON.stringify({ type: "flush" }));
      this.flushed = true;
    }
  }

  connect() {
    ui.state(this.lostAt ? "reconnecting" : "connecting", this.url);
    const ws = new WebSocket(this.url);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.acked = false;
    ws.onopen = () => {
      const ret = ["asr", "record_url", "metrics"];
      if (this.lang === "auto") ret.unshift("lid");
      ws.send(JSON.stringify({
        type: "start", flowId: this.flowId,
        audio: { codec: "pcm_s16le", sr: 16000, channels: 1, chunk_ms: FRAME_MS },
        return: ret, hints: { user_lang_pref: this.lang },
        features: ["seq_header"], client_version: "web-1",
        ...(this.token ? { auth: { token: this.token } } : {}),
      }));
    };
    ws.onmessage = (m) => {
      if (typeof m.data === "string") this.onEvent(JSON.parse(m.data));
    };
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.ended) return;
      const now = Date.now();
      if (!this.lostAt) this.lostAt = now;
      if (now - this.lostAt > RESUME_WINDOW_MS) {
        ui.state("disconnected", `gave up after ${RESUME_WINDOW_MS / 1000} s (close ${e.code})`);
        this.finish();
        return;
      }
      const wait = RETRY_MS[Math.min(this.retries++, RETRY_MS.length - 1)];
      ui.state("reconnecting", `in ${wait} ms (close ${e.code})`);
      setTimeout(() => this.connect(), wait);
    };
  }

  onEvent(ev) {
    this.events.push(ev);
    if (ev.type !== "ack") {
      if (this.seen.has(ev.seq)) return; // sent again after a resume: we have it
      this.seen.add(ev.seq);
    }
    switch (ev.type) {
      case "ack": {
        this.acked = true;
        this.lostAt = 0;
        this.retries = 0;
        const s = ev.session || {};
        if (s.resumed) {
          this.sendSeq = s.next_seq;
          const first = this.frames.length ? this.frames[0][0] : this.nextSeq;
          if (this.sendSeq < first) {
            ui.error("RESUME_GAP", `${(first - this.sendSeq) * FRAME_MS} ms no longer buffered`);
            this.sendSeq = first;
          }
          $("resumes").textContent = String(Number($("resumes").textContent || 0) + 1);
        }
        ui.state(this.stopping ? "finishing" : "streaming", s.resumed ? "resumed" : "");
        this.pump();
        break;
      }
      case "asr_partial": ui.utterance(ev, false); break;
      case "asr_final": ui.utterance(ev, true); break;
      case "lid":
        $("lang").textContent = `${ev.lang} (${Math.round(ev.score * 100)} %)`;
        $("lang").dataset.lang = ev.lang;
        break;
      case "record_url": {
        const a = $("record-link");
        a.href = ev.url;
        a.textContent = `${ev.url} (${(ev.duration_ms / 1000).toFixed(1)} s)`;
        $("player").src = ev.url;
        $("record").hidden = false;
        break;
      }
      case "metrics":
        $("metrics").textContent = `${(ev.audio_ms / 1000).toFixed(1)} s of audio`;
        break;
      case "flow":
        if (ev.state === "PAUSE") this.paused = true;
        if (ev.state === "RESUME") { this.paused = false; this.pump(); }
        $("flowstate").textContent = ev.state +
          (ev.retry_after_ms ? ` (retry after ${ev.retry_after_ms} ms)` : "");
        if (!this.stopping) ui.state(this.paused ? "paused" : "streaming");
        break;
      case "error":
        ui.error(ev.code, ev.message);
        if (ev.fatal) { // e.g. UNAUTHORIZED, BUSY: reconnecting would not help
          this.fatal = ev.code;
          this.finish();
          ui.state("error", ev.code);
        }
        break;
      case "end": // after a fatal error the state keeps saying which
        this.finish();
        if (!this.fatal) ui.state("ended", ev.reason);
        break;
      default: break; // unknown event types are ignored (protocol compatibility rule)
    }
  }
}

document.addEventListener("securitypolicyviolation", (e) => {
  ui.error("CSP", `${e.violatedDirective} blocked ${e.blockedURI}`);
});

let current = null;
$("start").addEventListener("click", async () => {
  $("start").disabled = true;
  $("transcript").replaceChildren();
  $("errors").replaceChildren();
  $("record").hidden = true;
  $("lang").textContent = "—";
  current = new Streamer();
  try {
    await current.start();
    $("stop").disabled = false;
  } catch (err) {
    ui.error("MICROPHONE", String(err));
    ui.state("error", "no microphone");
    current.stopCapture();
    $("start").disabled = false;
  }
});
$("stop").addEventListener("click", () => {
  $("stop").disabled = true;
  if (current) current.stop();
});
$("ws-url").textContent = params.get("ws") || defaultWsUrl();
ui.state("idle");
