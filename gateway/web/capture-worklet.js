// AudioWorklet: microphone samples -> 16 kHz PCM16 chunks of 20 ms (320 samples).
// Runs on the audio thread, so it only converts and posts; the page does the network.
// When the AudioContext cannot run at 16 kHz it low-passes (windowed-sinc FIR, cutoff
// 7.2 kHz) and resamples by linear interpolation: Whisper hears 0-8 kHz, and aliasing
// from a bare decimation would fold the 8-24 kHz band of a 48 kHz microphone into it.

const OUT_RATE = 16000;
const CHUNK = 320; // samples per posted chunk: 20 ms at 16 kHz

function lowpass(inRate, taps) {
  const fc = 7200 / inRate; // cutoff as a fraction of the input rate
  const h = new Float32Array(taps);
  const mid = (taps - 1) / 2;
  let sum = 0;
  for (let i = 0; i < taps; i++) {
    const x = i - mid;
    const sinc = x === 0 ? 2 * fc : Math.sin(2 * Math.PI * fc * x) / (Math.PI * x);
    const hann = 0.5 - 0.5 * Math.cos((2 * Math.PI * i) / (taps - 1));
    h[i] = sinc * hann;
    sum += h[i];
  }
  for (let i = 0; i < taps; i++) h[i] /= sum; // unity gain at DC
  return h;
}

class Pcm16Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / OUT_RATE; // input samples per output sample
    this.resample = sampleRate !== OUT_RATE;
    this.fir = this.resample ? lowpass(sampleRate, 63) : null;
    this.hist = this.resample ? new Float32Array(this.fir.length) : null; // FIR delay line
    this.hpos = 0;
    this.prev = 0; // last filtered sample, for interpolation across blocks
    this.pos = 0; // position of the next output sample, in input samples after `prev`
    this.out = new Int16Array(CHUNK);
    this.n = 0;
    this.peak = 0;
  }

  push(v) {
    const s = Math.max(-1, Math.min(1, v));
    this.out[this.n++] = s < 0 ? s * 0x8000 : s * 0x7fff;
    this.peak = Math.max(this.peak, Math.abs(s));
    if (this.n === CHUNK) {
      const pcm = this.out;
      this.port.postMessage({ pcm: pcm.buffer, peak: this.peak }, [pcm.buffer]);
      this.out = new Int16Array(CHUNK);
      this.n = 0;
      this.peak = 0;
    }
  }

  filter(x) {
    const h = this.fir, hist = this.hist, len = h.length;
    hist[this.hpos] = x;
    let acc = 0, j = this.hpos;
    for (let i = 0; i < len; i++) {
      acc += h[i] * hist[j];
      j = j === 0 ? len - 1 : j - 1;
    }
    this.hpos = (this.hpos + 1) % len;
    return acc;
  }

  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (!ch) return true; // no input connected yet: keep the node alive
    if (!this.resample) {
      for (let i = 0; i < ch.length; i++) this.push(ch[i]);
      return true;
    }
    for (let i = 0; i < ch.length; i++) {
      const cur = this.filter(ch[i]);
      // output samples falling between `prev` (at 0) and `cur` (at 1)
      while (this.pos <= 1) {
        this.push(this.prev + (cur - this.prev) * this.pos);
        this.pos += this.step;
      }
      this.pos -= 1;
      this.prev = cur;
    }
    return true;
  }
}

registerProcessor("pcm16-capture", Pcm16Capture);
