"""The playground's page: one HTML file, no build step, no outside resources."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>gaussdiff playground</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2em; max-width: 60em; color: #222; }
  form { display: grid; grid-template-columns: 12em 14em; gap: .4em 1em; align-items: center; }
  #preview { image-rendering: pixelated; width: 336px; border: 1px solid #ccc; margin-top: 1em;
             background: #f4f4f4; min-height: 336px; }
  #status { margin-top: .6em; min-height: 1.3em; }
  .error { color: #b00; }
  #downloads a { margin-right: 1em; }
</style>
</head>
<body>
<h1>gaussdiff playground</h1>
<form id="form" onsubmit="return false">
  <label for="model">model</label><select id="model"></select>
  <label for="sampler">sampler</label><select id="sampler"></select>
  <label for="steps">steps</label><input id="steps" type="number" min="1" value="18">
  <label for="seed">seed</label><input id="seed" type="number" min="0" value="0">
  <label for="num">images</label><input id="num" type="number" min="1" value="4">
  <label for="label">class</label><select id="label"></select>
  <label for="guidance">guidance scale</label><input id="guidance" type="number" step="0.5" min="0" placeholder="off">
  <label for="temperature">temperature</label><input id="temperature" type="number" step="0.05" min="0.05" max="2" value="1">
  <span></span><button id="start" type="button">Sample</button>
</form>
<div id="status"></div>
<img id="preview" alt="x&#770;0 preview">
<div id="downloads"></div>
<script>
let MODELS = [];
const $ = (id) => document.getElementById(id);

function fillModel() {
  const m = MODELS.find((x) => x.name === $("model").value);
  $("sampler").innerHTML = m.samplers.map((s) => `<option${s === m.default_sampler ? " selected" : ""}>${s}</option>`).join("");
  $("steps").value = m.default_steps;
  const classes = m.class_names || [];
  $("label").innerHTML = '<option value="">random</option>' +
    classes.map((c, i) => `<option value="${i}">${i}: ${c}</option>`).join("");
  $("label").disabled = classes.length === 0;
  $("guidance").disabled = !m.guidance;
  $("guidance").title = m.guidance || "this model has no guidance";
}

async function init() {
  const r = await fetch("/api/models");
  const info = await r.json();
  MODELS = info.models;
  $("model").innerHTML = MODELS.map((m) => `<option>${m.name}</option>`).join("");
  $("num").max = info.limits.max_images;
  fillModel();
  $("model").onchange = fillModel;
  $("start").onclick = start;
}

function request() {
  const body = { model: $("model").value, sampler: $("sampler").value,
                 steps: parseInt($("steps").value, 10), seed: parseInt($("seed").value, 10),
                 num: parseInt($("num").value, 10), temperature: parseFloat($("temperature").value) };
  if ($("label").value !== "" && !$("label").disabled) body.label = parseInt($("label").value, 10);
  if ($("guidance").value !== "" && !$("guidance").disabled) body.guidance_scale = parseFloat($("guidance").value);
  return body;
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function start() {
  $("start").disabled = true;
  $("downloads").innerHTML = "";
  status("queued");
  const t0 = performance.now();
  try {
    const r = await fetch("/api/sample", { method: "POST", headers: { "Content-Type": "application/json" },
                                           body: JSON.stringify(request()) });
    if (!r.ok) { status((await r.json()).error, true); return; }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\\n")) >= 0) {
        const event = JSON.parse(buffer.slice(0, nl));
        buffer = buffer.slice(nl + 1);
        handle(event, t0);
      }
    }
  } catch (e) {
    status(String(e), true);
  } finally {
    $("start").disabled = false;
  }
}

function handle(event, t0) {
  if (event.event === "step") {
    $("preview").src = event.preview;
    status(`step ${event.step} / ${event.steps}  (${((performance.now() - t0) / 1000).toFixed(1)} s)`);
  } else if (event.event === "done") {
    $("preview").src = event.image;
    status(`done: ${event.nfe} network evaluations per image, ${event.seconds.toFixed(2)} s`);
    $("downloads").innerHTML = `<a id="download-png" href="${event.png}" download>download PNG</a>` +
                               `<a id="download-npz" href="${event.npz}" download>download .npz</a>`;
  } else if (event.event === "error") {
    status(event.message, true);
  }
}

init();
</script>
</body>
</html>
"""
