// The playground page: asks the OpenAI-compatible API (POST v1/chat/completions, streamed) about an image with
// the chosen model and, in the same round, with the comparison model (one-to-one), and draws the AGF gates the
// chosen model returns ("return_gates": true -> gates.values, shape (tokens T, injection layers L, vision layers K)).
// Model text is only ever inserted as text (textContent), never as HTML.
"use strict";
(() => {
  const root = document.body.dataset.root;
  const keyName = "crosslayer_api_key:" + (root || "/");
  const $ = (id) => document.getElementById(id);
  const state = { info: null, image: null, gates: null, abort: null };

  class ApiError extends Error {
    constructor(status, message, param) {
      super(message);
      this.status = status;
      this.param = param;
    }
  }

  // --- the API ---------------------------------------------------------------------------------------------

  function headers() {
    const key = localStorage.getItem(keyName);
    const h = { "Content-Type": "application/json" };
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  async function errorOf(resp) {
    let body = null;
    try { body = await resp.json(); } catch (_) { /* not JSON: use the status line */ }
    const err = body && body.error;
    return new ApiError(resp.status, err ? err.message : `HTTP ${resp.status} ${resp.statusText}`, err && err.param);
  }

  // One streamed chat completion: calls onText(piece) as text arrives; -> {text, finish, gates, usage}.
  async function streamChat(request, onText, signal) {
    const resp = await fetch(root + "/v1/chat/completions", {
      method: "POST", headers: headers(), signal,
      body: JSON.stringify({ ...request, stream: true, stream_options: { include_usage: true } }),
    });
    if (!resp.ok) throw await errorOf(resp);
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    const out = { text: "", finish: null, gates: null, usage: null };
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") return out;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new ApiError(0, chunk.error.message, chunk.error.param);
          if (chunk.usage) out.usage = chunk.usage;
          if (chunk.gates) out.gates = chunk.gates;
          for (const choice of chunk.choices || []) {
            const piece = choice.delta && choice.delta.content;
            if (piece) { out.text += piece; onText(piece); }
            if (choice.finish_reason) out.finish = choice.finish_reason;
          }
        }
      }
    }
    throw new ApiError(0, "the answer stream ended early (no [DONE]); the server may have restarted");
  }

  // --- page state ------------------------------------------------------------------------------------------

  function showError(messages) {
    const box = $("error");
    const unique = [...new Set(messages.filter(Boolean))];
    box.textContent = unique.join("\n");
    box.hidden = unique.length === 0;
  }

  function card(id) {
    const el = $(id);
    return { el, name: el.querySelector(".model-name"), text: el.querySelector(".text"),
             meta: el.querySelector(".meta") };
  }

  function option(select, value, label) {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = label;
    select.appendChild(o);
  }

  function label(id) {
    const info = state.info;
    if (id === info.base) return `${id} (bare base, one-to-one)`;
    if (id === info.compare) return `${id} (one-to-one)`;
    return id;
  }

  const size = (n) => (n >= 2 ** 20 ? `${(n / 2 ** 20).toFixed(1)} MiB` : n >= 1024 ? `${(n / 1024).toFixed(1)} KiB`
    : `${n} bytes`);

  async function loadInfo() {
    const resp = await fetch(root + "/playground/info.json", { headers: headers() });
    if (!resp.ok) throw await errorOf(resp);
    const info = state.info = await resp.json();
    for (const id of info.models) option($("model"), id, label(id));
    $("model").value = info.default_model;
    option($("compare"), "", "nothing (no comparison)");
    for (const id of info.models) option($("compare"), id, label(id));
    $("compare").value = info.compare || "";
    const t = $("temperature"), m = $("max-tokens"), lim = info.limits;
    [t.min, t.max] = lim.temperature;
    [m.min, m.max, m.value] = [1, lim.max_tokens, Math.min(32, lim.default_max_tokens)];
    $("server-info").textContent = `${info.models.length} models; images up to ${size(lim.max_image_bytes)} and ` +
      `${(lim.max_image_pixels / 1e6).toFixed(1)} megapixels; up to ${lim.max_tokens} new tokens` +
      (info.compare ? "" : "; no one-to-one model served (start with --include-base)");
    $("forget-key").hidden = !info.key_required;
    for (const name of info.examples) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "example";
      b.title = name;
      const img = document.createElement("img");
      img.src = `${root}/playground/${name}`;
      img.alt = name;
      b.appendChild(img);
      b.addEventListener("click", () => loadExample(name));
      $("examples").appendChild(b);
    }
  }

  // --- the image ---------------------------------------------------------------------------------------------

  function setImage(dataUrl, name, bytes) {
    state.image = dataUrl;
    $("image-url").value = "";
    const img = $("preview");
    img.hidden = !dataUrl;
    $("drop-hint").hidden = !!dataUrl;
    $("image-info").textContent = "";
    if (!dataUrl) { img.removeAttribute("src"); return; }
    img.onload = () => {
      $("image-info").textContent = `${name}: ${size(bytes)}, ${img.naturalWidth}×${img.naturalHeight} px`;
    };
    img.src = dataUrl;
  }

  function readFile(file) {
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => setImage(reader.result, file.name || "pasted image", file.size);
    reader.onerror = () => showError([`could not read ${file.name}: ${reader.error}`]);
    reader.readAsDataURL(file);
  }

  async function loadExample(name) {
    const resp = await fetch(`${root}/playground/${name}`, { headers: headers() });
    if (!resp.ok) { showError([(await errorOf(resp)).message]); return; }
    const blob = await resp.blob();
    readFile(new File([blob], name.split("/").pop(), { type: blob.type }));
  }

  // --- asking ------------------------------------------------------------------------------------------------

  function settings() {
    const lim = state.info.limits;
    const temperature = Number($("temperature").value), maxTokens = Number($("max-tokens").value);
    const [tLo, tHi] = lim.temperature;
    const problems = [];
    if (!(temperature >= tLo && temperature <= tHi)) problems.push(`temperature must be in [${tLo}, ${tHi}]`);
    if (!(Number.isInteger(maxTokens) && maxTokens >= 1 && maxTokens <= lim.max_tokens)) {
      problems.push(`max tokens must be a whole number from 1 to ${lim.max_tokens} (the server's max_tokens)`);
    }
    const question = $("question").value.trim();
    if (!question) problems.push("type a question");
    return { temperature, maxTokens, question, problems };
  }

  function request(model, s, gates) {
    const content = state.image
      ? [{ type: "image_url", image_url: { url: state.image } }, { type: "text", text: s.question }]
      : s.question;
    const r = { model, messages: [{ role: "user", content }], temperature: s.temperature, max_tokens: s.maxTokens };
    if (s.temperature > 0) r.seed = 0;  // the two models sample alike from the same seed
    if (gates) r.return_gates = true;
    return r;
  }

  async function answer(target, model, s, wantGates, signal) {
    target.name.textContent = label(model);
    target.text.textContent = "";
    target.meta.textContent = "…";
    target.el.classList.add("streaming");
    target.el.classList.remove("failed");
    const started = performance.now();
    let result, note = "";
    try {
      try {
        result = await streamChat(request(model, s, wantGates), (p) => { target.text.textContent += p; }, signal);
      } catch (err) {
        if (!(wantGates && err.param === "return_gates")) throw err;
        note = "no gates: " + err.message;  // e.g. a baseline adapter: ask again without them
        target.text.textContent = "";
        result = await streamChat(request(model, s, false), (p) => { target.text.textContent += p; }, signal);
      }
      const secs = ((performance.now() - started) / 1000).toFixed(1);
      const tokens = result.usage ? result.usage.completion_tokens : "?";
      target.meta.textContent = `${tokens} tokens, ${secs} s, finish: ${result.finish}`;
      if (!result.text) target.text.textContent = "(empty answer)";
      return { ...result, note };
    } catch (err) {
      target.el.classList.add("failed");
      target.meta.textContent = err.name === "AbortError" ? "cancelled" : `error${err.status ? " " + err.status : ""}`;
      if (err.name !== "AbortError") target.text.textContent = err.message;
      throw err;
    } finally {
      target.el.classList.remove("streaming");
    }
  }

  async function ask() {
    const s = settings();
    if (s.problems.length) { showError(s.problems); return; }
    showError([]);
    if (state.abort) state.abort.abort();
    const abort = state.abort = new AbortController();
    const model = $("model").value, compare = $("compare").value;
    const wantGates = !!state.image && model !== state.info.base;
    drawGates(null, wantGates ? "waiting for the answer…" : state.image
      ? "the bare base has no gates" : "gates need an image in the question");
    const main = card("answer-main"), other = card("answer-compare");
    const rounds = [answer(main, model, s, wantGates, abort.signal)];
    other.el.hidden = !compare || compare === model;
    if (!other.el.hidden) rounds.push(answer(other, compare, s, false, abort.signal));
    $("ask-button").disabled = true;
    const results = await Promise.allSettled(rounds);
    $("ask-button").disabled = false;
    if (abort !== state.abort) return;  // a newer question took over
    const errors = results.filter((r) => r.status === "rejected" && r.reason.name !== "AbortError")
      .map((r) => r.reason.message);
    showError(errors);
    if (results[0].status === "fulfilled") {
      const r = results[0].value;
      drawGates(r.gates, r.gates ? null : r.note || (wantGates ? "the answer carried no gates" : null));
    } else {
      drawGates(null, "no answer, no gates");
    }
  }

  // --- the gates -------------------------------------------------------------------------------------------

  // viridis at 0, .25, .5, .75, 1, linearly interpolated (as matplotlib draws `crosslayer gates`)
  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  function colour(v) {
    const x = Math.min(Math.max(v, 0), 1) * (VIRIDIS.length - 1);
    const i = Math.min(Math.floor(x), VIRIDIS.length - 2), f = x - i;
    const c = VIRIDIS[i].map((a, j) => Math.round(a + (VIRIDIS[i + 1][j] - a) * f));
    return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
  }
  const ink = (v) => (v > 0.6 ? "#111" : "#fff");
  const mean = (rows) => rows.flat().reduce((a, b) => a + b, 0) / rows.flat().length;  // (L, K) -> scalar
  const shown = (token) => (token === "" ? "∅" : token.replace(/\n/g, "⏎").replace(/ /g, "·"));

  function drawGates(gates, note) {
    state.gates = gates;
    $("gates-note").textContent = note || "";
    $("gates-note").hidden = !note;
    const strip = $("token-strip"), svg = $("mean-gate"), table = $("heatmap");
    strip.replaceChildren();
    svg.replaceChildren();
    table.replaceChildren();
    $("heatmap-token").textContent = "–";
    delete table.dataset.rows;
    delete table.dataset.cols;
    $("gates").classList.toggle("empty", !gates || !gates.values.length);
    if (!gates || !gates.values.length) return;
    const means = gates.values.map(mean);  // (T,)
    gates.values.forEach((_, t) => {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "tok";
      b.textContent = shown(gates.tokens[t]);
      b.title = `token ${t}: mean gate ${means[t].toFixed(3)}`;
      b.style.background = colour(means[t]);
      b.style.color = ink(means[t]);
      b.addEventListener("click", () => selectToken(t));
      strip.appendChild(b);
    });
    drawMeans(svg, means);
    selectToken(0);
  }

  function drawMeans(svg, means) {
    const ns = "http://www.w3.org/2000/svg", w = 460, h = 110, pad = 24;
    const bw = Math.min((w - pad) / means.length, 40);  // bar width: thin for short answers too
    svg.setAttribute("viewBox", `0 0 ${w} ${h + 16}`);
    const el = (name, attrs, text) => {
      const e = document.createElementNS(ns, name);
      for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
      if (text !== undefined) e.textContent = text;
      svg.appendChild(e);
      return e;
    };
    for (const y of [0, 0.5, 1]) {
      el("line", { x1: pad, x2: w, y1: h - y * (h - 8), y2: h - y * (h - 8), class: "grid-line" });
      el("text", { x: pad - 4, y: h - y * (h - 8) + 4, class: "axis", "text-anchor": "end" }, String(y));
    }
    means.forEach((m, t) => {
      const bar = el("rect", { x: pad + t * bw + 1, y: h - m * (h - 8), width: Math.max(bw - 2, 1),
                               height: m * (h - 8), fill: colour(m), class: "bar", "data-token": t });
      bar.appendChild(document.createElementNS(ns, "title")).textContent = `token ${t}: mean gate ${m.toFixed(3)}`;
      bar.addEventListener("click", () => selectToken(t));
    });
    el("text", { x: pad, y: h + 14, class: "axis" }, "generated token →");
  }

  function selectToken(t) {
    const gates = state.gates;
    document.querySelectorAll("#token-strip .tok").forEach((b, i) => b.classList.toggle("selected", i === t));
    document.querySelectorAll("#mean-gate .bar").forEach((b, i) => b.classList.toggle("selected", i === t));
    $("heatmap-token").textContent = `${t} "${shown(gates.tokens[t])}"`;
    const table = $("heatmap"), grid = gates.values[t];  // (L, K)
    table.replaceChildren();
    table.dataset.rows = grid.length;
    table.dataset.cols = grid[0].length;
    const head = table.createTHead().insertRow();
    head.appendChild(document.createElement("th")).textContent = "decoder layer \\ vision layer";
    for (const k of gates.vision_layers) head.appendChild(document.createElement("th")).textContent = k;
    const body = table.createTBody();
    grid.forEach((row, l) => {
      const tr = body.insertRow();
      tr.appendChild(document.createElement("th")).textContent = gates.inject_layers[l];
      row.forEach((v) => {
        const td = tr.insertCell();
        td.className = "cell";
        td.textContent = v.toFixed(2);
        td.style.background = colour(v);
        td.style.color = ink(v);
      });
    });
  }

  // --- wiring ------------------------------------------------------------------------------------------------

  $("image-file").addEventListener("change", (e) => readFile(e.target.files[0]));
  $("image-url").addEventListener("change", (e) => {
    const url = e.target.value.trim();
    $("image-file").value = "";
    setImage(null);
    state.image = url || null;  // the server fetches it (or says why not); not previewed: the page loads only its own
    e.target.value = url;
    $("image-info").textContent = url ? "image URL: the server fetches it" : "";
  });
  $("clear-image").addEventListener("click", () => { $("image-file").value = ""; setImage(null); });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    readFile(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
    if (item) { e.preventDefault(); readFile(item.getAsFile()); }
  });
  $("ask-button").addEventListener("click", ask);
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) ask();
  });
  $("forget-key").addEventListener("click", () => {
    localStorage.removeItem(keyName);
    document.cookie = `crosslayer_api_key=; Path=${root || "/"}; SameSite=Strict; Max-Age=0`;
    location.reload();
  });
  $("answer-compare").hidden = true;
  drawGates(null, $("gates-note").textContent);
  loadInfo().catch((err) => showError([`could not load the playground's settings: ${err.message}`]));
})();
