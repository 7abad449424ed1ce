// dsstream demo page: live transcription from the microphone and questions
// about an image, over the protocol v1 WebSocket endpoint (docs/protocol.md).
"use strict";

const $ = (id) => document.getElementById(id);
const pageParams = new URLSearchParams(location.search);

function streamUrl() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const token = pageParams.get("token");
  const query = token ? `?token=${encodeURIComponent(token)}` : "";
  return `${scheme}://${location.host}/v1/stream${query}`;
}

function log(text, isError = false) {
  const line = document.createElement("div");
  line.textContent = text;
  if (isError) line.className = "error";
  const box = $("log");
  box.appendChild(line);
  while (box.childNodes.length > 200) box.removeChild(box.firstChild);
  box.scrollTop = box.scrollHeight;
}

// A session over one WebSocket: start, then route events to handlers.
function openSession(task, options, handlers) {
  const ws = new WebSocket(streamUrl());
  ws.binaryType = "arraybuffer";
  let live = false;  // between started and ended (or a fatal error)
  const ready = new Promise((resolve, reject) => {
    ws.onopen = () => ws.send(JSON.stringify({ type: "start", task, ...options }));
    ws.onerror = () => reject(new Error("WebSocket error"));
    ws.onclose = (ev) => {
      reject(new Error(`closed (${ev.code}) before the session started`));
      if (live) {
        // The process serving the session went away (as the Python client
        // reports it: docs/protocol.md, "unavailable").
        live = false;
        const lost = { type: "error", code: "unavailable", fatal: true,
          message: `the connection was lost before the session ended (close ${ev.code}); start a new session` };
        log(JSON.stringify(lost), true);
        if (handlers.error) handlers.error(lost);
      }
      if (handlers.close) handlers.close(ev);
    };
    ws.onmessage = (msg) => {
      const event = JSON.parse(msg.data);
      if (event.type !== "partial") log(msg.data, event.type === "error");
      if (event.type === "started") live = true;
      if (event.type === "ended" || (event.type === "error" && event.fatal)) live = false;
      if (event.type === "started") resolve(event);
      else if (event.type === "error" && event.fatal) reject(new Error(event.message));
      const handler = handlers[event.type];
      if (handler) handler(event);
    };
  });
  return { ws, ready };
}

async function checkHealth() {
  try {
    const health = await (await fetch("/healthz")).json();
    const parts = [];
    for (const [task, models] of Object.entries(health.models)) {
      for (const [name, state] of Object.entries(models)) {
        parts.push(`${task}/${name}: ${state === "ok" ? "ready" : "not installed"}`);
      }
    }
    $("health").textContent = `v${health.version} · ${parts.join(" · ")}`;
    const asrModels = Object.values(health.models.asr || {});
    vqa.speechAvailable = asrModels.some((state) => state === "ok");
    $("voice-ask").disabled = !vqa.speechAvailable;
  } catch (err) {
    $("health").textContent = `the server is unreachable (${err.message}); reload the page once it is up`;
  }
}

// ---------------------------------------------------------------- ASR

const asr = { session: null, context: null, stream: null, node: null };

function showFinal(event) {
  if (event.text) {
    const span = document.createElement("span");
    span.className = "final-segment";
    span.textContent = event.text;
    $("finals").appendChild(span);
  }
  $("partial").textContent = "";
}

// Words the recognizer was less sure of than this are marked on the page.
const LOW_CONFIDENCE = 0.6;

// A whole file through the OpenAI-compatible REST endpoint, as its SDKs send
// it; the words come back with their times and confidences.
async function transcribeFile(file) {
  $("file-status").textContent = `transcribing ${file.name}…`;
  $("file-words").textContent = "";
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("model", "whisper-1");
  form.append("response_format", "verbose_json");
  form.append("timestamp_granularities[]", "word");
  const hotwords = listOption("hotwords");
  if (hotwords.length) form.append("prompt", hotwords.join(" "));
  form.append("punctuate", $("punctuate").checked ? "true" : "false");
  let response;
  try {
    response = await fetch("/v1/audio/transcriptions", { method: "POST", body: form });
  } catch (err) {
    $("file-status").textContent = `the server is unreachable: ${err.message}`;
    return null;
  }
  const body = await response.json();
  if (!response.ok) {
    $("file-status").textContent = `error ${response.status}: ${body.error.message}`;
    return body;
  }
  let low = 0;
  for (const w of body.words) {
    const span = document.createElement("span");
    span.className = w.confidence < LOW_CONFIDENCE ? "word low" : "word";
    low += w.confidence < LOW_CONFIDENCE ? 1 : 0;
    span.textContent = w.word;
    span.title = `${w.start.toFixed(2)}–${w.end.toFixed(2)} s, confidence ${w.confidence.toFixed(2)}`;
    $("file-words").append(span, " ");
  }
  $("file-status").textContent = `${file.name}: ${body.duration.toFixed(1)} s, ${body.words.length} words` +
    ` (${low} below ${LOW_CONFIDENCE} confidence, underlined; hover a word for its times)`;
  return body;
}

function listOption(id) {
  return $(id).value.split(",").map((w) => w.trim()).filter((w) => w.length > 0);
}

// Commands: a grammar (each final one of them, "[unk]" for other speech, shown
// as said); else hotwords, and finals punctuated where the box is ticked.
function wordOptions() {
  const commands = listOption("commands");
  if (commands.length) return { grammar: [...commands, "[unk]"] };
  return { hotwords: listOption("hotwords"), ...($("punctuate").checked ? { punctuate: true } : {}) };
}

async function startMic() {
  $("mic-start").disabled = true;
  // A session stopped just before still sends its last events and closes later:
  // from now on it is not the current one, so it cannot touch the new capture.
  asr.session = null;
  $("asr-status").textContent = "starting…";
  try {
    // The audio graph is ready before the microphone opens, and what it captures
    // while the session starts is held and sent once it has: speech from the
    // first moment is never lost (a slow server or page used to clip it).
    asr.context = new AudioContext();
    await asr.context.audioWorklet.addModule("/worklet.js");
    asr.node = new AudioWorkletNode(asr.context, "capture-processor");
    const early = [];
    asr.node.port.onmessage = (msg) => early.push(msg.data.buffer);
    asr.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
    asr.context.createMediaStreamSource(asr.stream).connect(asr.node);
    const options = { encoding: "f32le", sample_rate: asr.context.sampleRate, ...wordOptions() };
    let session = null;  // only the current session updates the status and capture
    const current = (fn) => (e) => { if (asr.session === session) fn(e); };
    session = asr.session = openSession("asr", options, {
      partial: current((e) => { $("partial").textContent = e.text; }),
      final: showFinal,
      ended: current(() => { $("asr-status").textContent = "ended"; }),
      error: current((e) => { $("asr-status").textContent = `error: ${e.code}: ${e.message}`; }),
      close: current(() => stopCapture()),
    });
    const started = await asr.session.ready;
    $("asr-status").textContent = `listening (${started.options.model || "model"}, ${options.sample_rate} Hz)`;
    const send = (buffer) => {
      if (asr.session && asr.session.ws.readyState === WebSocket.OPEN) asr.session.ws.send(buffer);
    };
    early.splice(0).forEach(send);
    asr.node.port.onmessage = (msg) => {
      showLevel(msg.data);
      send(msg.data.buffer);
    };
    $("mic-stop").disabled = false;
  } catch (err) {
    $("asr-status").textContent = err.name === "NotAllowedError"
      ? "the microphone is blocked for this page: allow it in the browser's site settings, then start again"
      : `could not start: ${err.message}`;
    stopCapture();
  }
}

// The microphone's level (RMS of each captured block, 0 to 1 on a scale where
// ordinary speech sits mid-way): the user sees the page hears them.
function showLevel(samples) {
  let sum = 0;
  for (let i = 0; i < samples.length; i++) sum += samples[i] * samples[i];
  const rms = Math.sqrt(sum / Math.max(1, samples.length));
  $("level").value = Math.min(1, rms * 8);
}

function stopCapture() {
  $("level").value = 0;
  if (asr.stream) asr.stream.getTracks().forEach((t) => t.stop());
  if (asr.context) asr.context.close();
  asr.stream = asr.context = asr.node = null;
  $("mic-start").disabled = false;
  $("mic-stop").disabled = true;
}

function stopMic() {
  stopCapture();
  if (asr.session && asr.session.ws.readyState === WebSocket.OPEN) {
    asr.session.ws.send(JSON.stringify({ type: "end" }));
    $("asr-status").textContent = "finishing…";
  }
}

// ---------------------------------------------------------------- VQA

const vqa = {
  session: null, nextId: 1, pending: new Map(),
  speechAvailable: false, speech: false, rate: 0, voice: null,
};

// With spoken questions on, each binary frame starts with its kind: 1 image, 2 audio.
function tagged(kind, buffer) {
  const out = new Uint8Array(1 + buffer.byteLength);
  out[0] = kind;
  out.set(new Uint8Array(buffer), 1);
  return out.buffer;
}

function addAnswerItem(id, text) {
  const item = document.createElement("li");
  item.textContent = text;
  $("answers").appendChild(item);
  vqa.pending.set(id, item);
  return item;
}

async function vqaSession() {
  if (vqa.session && vqa.session.ws.readyState === WebSocket.OPEN) return vqa.session;
  const options = {};
  vqa.speech = vqa.speechAvailable;
  if (vqa.speech) {
    // The question audio goes at the rate the microphone will be captured at.
    const probe = new AudioContext();
    vqa.rate = probe.sampleRate;
    probe.close();
    options.speech = { encoding: "f32le", sample_rate: vqa.rate };
  }
  vqa.session = openSession("vqa", options, {
    partial: (e) => { $("vqa-status").textContent = `hearing: ${e.text}`; },
    answer: (e) => {
      const item = vqa.pending.get(e.id) || addAnswerItem(e.id, `🎤 "${e.transcript || ""}"`);
      item.textContent += ` → ${e.text} (score ${e.score.toFixed(2)}, ${e.latency_ms.toFixed(0)} ms)`;
    },
    error: (e) => { $("vqa-status").textContent = `error: ${e.code}: ${e.message}`; },
    close: () => { $("vqa-status").textContent = "no session"; stopVoice(false); },
  });
  await vqa.session.ready;
  $("vqa-status").textContent = vqa.speech ? "session open (typed or spoken questions)" : "session open";
  return vqa.session;
}

async function sendImage(blob) {
  $("image-preview").src = URL.createObjectURL(blob);
  try {
    const session = await vqaSession();
    const data = await blob.arrayBuffer();
    session.ws.send(vqa.speech ? tagged(1, data) : data);
    $("vqa-status").textContent = `image sent (${blob.size} bytes)`;
  } catch (err) {
    $("vqa-status").textContent = `could not start: ${err.message}`;
  }
}

// The sample scenes shipped with the VQA model: click one instead of
// starting from an empty image; its sample question fills the box.
async function loadScenes() {
  let scenes = [];
  try {
    scenes = await (await fetch("/scenes")).json();
  } catch (err) {
    return;  // checkHealth reports an unreachable server
  }
  for (const scene of scenes) {
    const img = document.createElement("img");
    img.src = `/scenes/${scene.name}`;
    img.alt = scene.name;
    img.addEventListener("click", async () => {
      document.querySelectorAll("#scenes img").forEach((i) => i.classList.remove("chosen"));
      img.classList.add("chosen");
      if (scene.questions.length) $("question").value = scene.questions[0];
      await sendImage(await (await fetch(img.src)).blob());
    });
    $("scenes").appendChild(img);
  }
}

async function startVoice() {
  try {
    const session = await vqaSession();
    if (!vqa.speech) throw new Error("spoken questions need the ASR model");
    // The audio graph first, so the question is captured from the moment the microphone opens.
    const context = new AudioContext({ sampleRate: vqa.rate });
    await context.audioWorklet.addModule("/worklet.js");
    const node = new AudioWorkletNode(context, "capture-processor");
    node.port.onmessage = (msg) => {
      if (session.ws.readyState === WebSocket.OPEN) session.ws.send(tagged(2, msg.data.buffer));
    };
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
    context.createMediaStreamSource(stream).connect(node);
    vqa.voice = { stream, context };
    $("voice-ask").textContent = "Done asking";
    $("vqa-status").textContent = "listening for a question…";
  } catch (err) {
    $("vqa-status").textContent = `voice unavailable: ${err.message}`;
  }
}

function stopVoice(flush = true) {
  if (!vqa.voice) return;
  vqa.voice.stream.getTracks().forEach((t) => t.stop());
  vqa.voice.context.close();
  vqa.voice = null;
  $("voice-ask").textContent = "Ask by voice";
  if (flush && vqa.session && vqa.session.ws.readyState === WebSocket.OPEN) {
    vqa.session.ws.send(JSON.stringify({ type: "flush" }));  // answer what was said so far
  }
}

async function captureImage() {
  const video = $("camera");
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ video: true });
    video.srcObject = stream;
    await video.play();
    const canvas = document.createElement("canvas");
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    canvas.getContext("2d").drawImage(video, 0, 0);
    stream.getTracks().forEach((t) => t.stop());
    canvas.toBlob((blob) => sendImage(blob), "image/jpeg", 0.9);
  } catch (err) {
    $("vqa-status").textContent = `camera unavailable: ${err.message}`;
  }
}

async function askQuestion(ev) {
  ev.preventDefault();
  const text = $("question").value.trim();
  if (!text) return;
  try {
    const session = await vqaSession();
    const id = `q${vqa.nextId++}`;
    addAnswerItem(id, text);
    session.ws.send(JSON.stringify({ type: "question", id, text }));
  } catch (err) {
    $("vqa-status").textContent = `could not start: ${err.message}`;
  }
}

// ---------------------------------------------------------------- wiring

$("mic-start").addEventListener("click", startMic);
$("voice-ask").addEventListener("click", () => (vqa.voice ? stopVoice() : startVoice()));
$("mic-stop").addEventListener("click", stopMic);
$("image-file").addEventListener("change", (ev) => {
  const file = ev.target.files[0];
  if (file) sendImage(file);
});
$("image-capture").addEventListener("click", captureImage);
$("question-form").addEventListener("submit", askQuestion);
$("audio-file").addEventListener("change", (ev) => {
  const file = ev.target.files[0];
  if (file) transcribeFile(file);
});
$("drop").addEventListener("dragover", (ev) => { ev.preventDefault(); $("drop").classList.add("over"); });
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (ev) => {
  ev.preventDefault();
  $("drop").classList.remove("over");
  const file = ev.dataTransfer.files[0];
  if (file) transcribeFile(file);
});
checkHealth();
loadScenes();
