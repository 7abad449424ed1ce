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
  const ready = new Promise((resolve, reject) => {
    ws.onopen = () => ws.send(JSON.stringify({ type: "start", task, ...options }));
    ws.onerror = () => reject(new Error("WebSocket error"));
    ws.onclose = (ev) => {
      reject(new Error(`closed (${ev.code}) before the session started`));
      if (handlers.close) handlers.close(ev);
    };
    ws.onmessage = (msg) => {
      const event = JSON.parse(msg.data);
      if (event.type !== "partial") log(msg.data, event.type === "error");
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
  } catch (err) {
    $("health").textContent = `server unreachable: ${err.message}`;
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

function hotwordOption() {
  return $("hotwords").value.split(",").map((w) => w.trim()).filter((w) => w.length > 0);
}

async function startMic() {
  $("mic-start").disabled = true;
  $("asr-status").textContent = "starting…";
  try {
    asr.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
    asr.context = new AudioContext();
    await asr.context.audioWorklet.addModule("/worklet.js");
    const source = asr.context.createMediaStreamSource(asr.stream);
    asr.node = new AudioWorkletNode(asr.context, "capture-processor");
    const options = { encoding: "f32le", sample_rate: asr.context.sampleRate, hotwords: hotwordOption() };
    asr.session = openSession("asr", options, {
      partial: (e) => { $("partial").textContent = e.text; },
      final: showFinal,
      ended: () => { $("asr-status").textContent = "ended"; },
      error: (e) => { $("asr-status").textContent = `error: ${e.code}: ${e.message}`; },
      close: () => stopCapture(),
    });
    const started = await asr.session.ready;
    $("asr-status").textContent = `listening (${started.options.model || "model"}, ${options.sample_rate} Hz)`;
    asr.node.port.onmessage = (msg) => {
      if (asr.session && asr.session.ws.readyState === WebSocket.OPEN) asr.session.ws.send(msg.data.buffer);
    };
    source.connect(asr.node);
    $("mic-stop").disabled = false;
  } catch (err) {
    $("asr-status").textContent = `could not start: ${err.message}`;
    stopCapture();
  }
}

function stopCapture() {
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

const vqa = { session: null, nextId: 1, pending: new Map() };

async function vqaSession() {
  if (vqa.session && vqa.session.ws.readyState === WebSocket.OPEN) return vqa.session;
  vqa.session = openSession("vqa", {}, {
    answer: (e) => {
      const item = vqa.pending.get(e.id);
      if (item) item.textContent += ` → ${e.text} (score ${e.score.toFixed(2)}, ${e.latency_ms.toFixed(0)} ms)`;
    },
    error: (e) => { $("vqa-status").textContent = `error: ${e.code}: ${e.message}`; },
    close: () => { $("vqa-status").textContent = "no session"; },
  });
  await vqa.session.ready;
  $("vqa-status").textContent = "session open";
  return vqa.session;
}

async function sendImage(blob) {
  $("image-preview").src = URL.createObjectURL(blob);
  try {
    const session = await vqaSession();
    session.ws.send(await blob.arrayBuffer());
    $("vqa-status").textContent = `image sent (${blob.size} bytes)`;
  } catch (err) {
    $("vqa-status").textContent = `could not start: ${err.message}`;
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
    const item = document.createElement("li");
    item.textContent = text;
    $("answers").appendChild(item);
    vqa.pending.set(id, item);
    session.ws.send(JSON.stringify({ type: "question", id, text }));
  } catch (err) {
    $("vqa-status").textContent = `could not start: ${err.message}`;
  }
}

// ---------------------------------------------------------------- wiring

$("mic-start").addEventListener("click", startMic);
$("mic-stop").addEventListener("click", stopMic);
$("image-file").addEventListener("change", (ev) => {
  const file = ev.target.files[0];
  if (file) sendImage(file);
});
$("image-capture").addEventListener("click", captureImage);
$("question-form").addEventListener("submit", askQuestion);
checkHealth();
