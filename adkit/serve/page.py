"""The service's page at ``/``: pick a model, drop images, see each with its overlay, score and decision, and the
model card. One self-contained page (inline style and script; the service runs offline)."""

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>adkit serve</title><style>
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; }
#drop { border: 2px dashed #999; padding: 2em; text-align: center; margin: 1em 0; }
#drop.over { background: #eef; } .result { display: flex; gap: 1em; align-items: center; margin: .5em 0; }
.result img { max-height: 160px; } .anomalous { color: #b00; font-weight: bold; } .normal { color: #070; }
.reported { color: #555; } pre { background: #f7f7f7; padding: .6em; font-size: .85em; overflow-x: auto; }
</style></head><body>
<h1>adkit serve</h1>
<p><label>Model <select id="model"></select></label>
<label> Token <input id="token" type="password" placeholder="if the service has one"></label>
<label> Threshold <input id="threshold" placeholder="recorded (or value:X, fpr:RATE)"></label></p>
<div id="drop">Drop images here, or <input id="files" type="file" accept="image/*" multiple></div>
<h2>Latest results</h2><div id="results"></div>
<h2>Model card</h2><pre id="card"></pre>
<script>
const $ = id => document.getElementById(id);
const headers = () => $("token").value ? {"Authorization": "Bearer " + $("token").value} : {};
let cards = {};
async function loadModels() {
  const response = await fetch("/v1/models", {headers: headers()});
  if (!response.ok) { $("card").textContent = (await response.json()).error; return; }
  const models = (await response.json()).models;
  cards = Object.fromEntries(models.map(m => [m.name, m]));
  $("model").innerHTML = models.map(m => `<option>${m.name}</option>`).join("");
  showCard();
}
function showCard() { $("card").textContent = JSON.stringify(cards[$("model").value] || {}, null, 1); }
async function score(files) {
  const form = new FormData();
  for (const file of files) form.append("image", file, file.name);
  const query = new URLSearchParams({overlay: "1"});
  if ($("threshold").value) query.set("threshold", $("threshold").value);
  const response = await fetch(`/v1/models/${$("model").value}/predict?${query}`,
                               {method: "POST", body: form, headers: headers()});
  const body = await response.json();
  if (!response.ok) { $("results").insertAdjacentHTML("afterbegin", `<p class="anomalous">${body.error}</p>`); return; }
  const sent = Array.from(files);
  body.results.forEach((r, i) => { uploaded[r.image_sha256] = {file: sent[i], model: body.model}; });
  for (const r of body.results.reverse()) {
    const verdict = r.decision === null ? "no threshold" : (r.decision ? "anomalous" : "normal");
    $("results").insertAdjacentHTML("afterbegin", `<div class="result"><img src="data:image/png;base64,${r.overlay_png}">
      <div><b>${r.name}</b><br>score ${r.score.toPrecision(5)} against threshold ${r.threshold === null ? "-" :
      r.threshold.toPrecision(5)} (${r.policy || "-"})<br><span class="${verdict}">${verdict}</span><br>
      <button class="report" data-sha="${r.image_sha256}" data-label="good">false alarm</button>
      <button class="report" data-sha="${r.image_sha256}" data-label="defect">defect</button>
      <span class="reported"></span></div></div>`);
  }
}
let uploaded = {};
async function report(button) {
  const sha = button.dataset.sha, part = uploaded[sha];
  const form = new FormData();
  form.append("image_sha256", sha);
  form.append("label", button.dataset.label);
  if (part && part.file) form.append("image", part.file, part.file.name);
  const response = await fetch(`/v1/models/${part ? part.model : $("model").value}/feedback`,
                               {method: "POST", body: form, headers: headers()});
  const answer = await response.json();
  button.parentElement.querySelector(".reported").textContent =
    response.ok ? ` reported: ${answer.stored.label}` : ` not reported: ${answer.error}`;
}
document.addEventListener("click", event => { if (event.target.classList.contains("report")) report(event.target); });
$("model").addEventListener("change", showCard);
$("token").addEventListener("change", loadModels);
$("files").addEventListener("change", event => score(event.target.files));
const drop = $("drop");
drop.addEventListener("dragover", event => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", event => { event.preventDefault(); drop.classList.remove("over");
                                         score(event.dataTransfer.files); });
loadModels();
</script></body></html>
"""
