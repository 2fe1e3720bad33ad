// The web page: pick a model, give it a picture, see the classes. Plain JavaScript, no build step.
// Every request goes to this server, by relative URL; the picture is shown from a local blob: URL. The token,
// when the server asks for one, lives in `state.token` only: no storage, no cookie.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const state = {
    token: null, // the bearer token, in memory only
    models: [], // GET /models entries
    maxBytes: null, // max_request_bytes, from the API's document
    maxTopK: 1000,
    file: null,
    previewUrl: null,
    busy: false,
  };

  // ---------------------------------------------------------------------------------------- requests

  async function call(path, options = {}) {
    const headers = { ...(options.headers || {}) };
    if (state.token) headers.Authorization = `Bearer ${state.token}`;
    return fetch(path, { ...options, headers, cache: "no-store", credentials: "omit" });
  }

  async function errorOf(response) {
    try {
      const body = await response.json();
      if (body && typeof body.code === "string") return body;
    } catch (_) {
      // not our JSON error body
    }
    return { code: `http_${response.status}`, message: `the server answered ${response.status}` };
  }

  // ------------------------------------------------------------------------------------------ messages

  function megabytes(bytes) {
    if (bytes < 1024 * 1024) return `${Math.max(1, Math.round(bytes / 1024))} KB`;
    return `${(bytes / (1024 * 1024)).toFixed(bytes >= 10 * 1024 * 1024 ? 0 : 1)} MB`;
  }

  // An error body in plain words: what went wrong, and what to do about it.
  function plainWords(error, model) {
    switch (error.code) {
      case "request_too_large":
        return state.maxBytes
          ? `The image is too large: this server takes up to ${megabytes(state.maxBytes)} per picture.`
          : "The image is too large for this server.";
      case "image_too_large":
        return "The image is too large: it has too many pixels (or is too long and thin) for this server.";
      case "invalid_image":
      case "unsupported_format":
        return "This file is not an image the server can read. Choose a JPEG, PNG, WebP, GIF, BMP or TIFF picture.";
      case "url_not_allowed":
        return "That is a web address, not a picture: this server never fetches URLs. Save the picture and choose the file.";
      case "not_found":
        return `Unknown model: ${model || "the one asked for"}. Reload the page to see the models this server has.`;
      case "model_unavailable":
        return `The model ${model || ""} is not available on the server: ${error.message}`;
      case "overloaded":
        return "The server is busy. Try again in a moment.";
      case "deadline_exceeded":
        return "The server took too long to answer. Try again, or choose less augmentation.";
      case "unavailable":
        return "The server is starting. Try again in a moment.";
      case "unauthenticated":
        return "This server needs a token.";
      default:
        return error.message ? `The server refused the request: ${error.message}` : "Something went wrong.";
    }
  }

  function showError(text) {
    $("error").textContent = text;
    $("error").hidden = !text;
    if (text) $("status").textContent = "";
  }

  function status(text) {
    $("status").textContent = text;
  }

  // ------------------------------------------------------------------------------------------- token

  function askForToken(refused) {
    $("token-note").textContent = refused
      ? "That token was refused. Enter the right one: it is kept in this page's memory only."
      : "Enter the bearer token. The page keeps it in memory only: it is forgotten when you close or reload the page.";
    $("token-form").hidden = false;
    $("token").focus();
  }

  // A 401: forget a token that was refused and ask again. True when the answer was one.
  function unauthorized(response) {
    if (response.status !== 401) return false;
    const refused = state.token !== null;
    state.token = null;
    askForToken(refused);
    showError(refused ? "The token was refused." : "This server needs a token.");
    return true;
  }

  $("token-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    $("token").value = "";
    if (!value) return;
    state.token = value;
    $("token-form").hidden = true;
    showError("");
    if (await start() && state.file) classify();
  });

  // -------------------------------------------------------------------------------- models, settings

  // The limits and choices the API's own document gives: TTA modes, the top_k bound, the body limit.
  async function loadDescription() {
    const response = await call("openapi.json");
    if (unauthorized(response)) return false;
    if (!response.ok) return true; // the page works without it, with the defaults it has
    const doc = await response.json();
    const parameters = (doc.components && doc.components.parameters) || {};
    const modes = parameters.tta && parameters.tta.schema && parameters.tta.schema.enum;
    if (Array.isArray(modes) && modes.length) {
      const select = $("tta");
      const chosen = select.value || "none";
      select.replaceChildren(...modes.map((mode) => new Option(mode, mode, false, mode === chosen)));
    }
    const topK = parameters.top_k && parameters.top_k.schema;
    if (topK && Number.isInteger(topK.maximum)) state.maxTopK = topK.maximum;
    const limits = doc.info && doc.info["x-limits"];
    if (limits && Number.isInteger(limits.max_request_bytes)) {
      state.maxBytes = limits.max_request_bytes;
      $("max-size").textContent = megabytes(state.maxBytes);
    }
    return true;
  }

  async function loadModels() {
    let response;
    try {
      response = await call("models");
    } catch (_) {
      showError("Could not reach the server.");
      return false;
    }
    if (unauthorized(response)) return false;
    if (!response.ok) {
      showError(plainWords(await errorOf(response)));
      return false;
    }
    const body = await response.json();
    state.models = body.models || [];
    const select = $("model");
    const previous = select.selectedOptions.length ? select.value : "";
    const options = state.models.map((m, i) => {
      const ready = m.state === "READY";
      const text = `${m.name} (version ${m.version}, ${m.label_count} classes)${ready ? "" : ` — ${m.state}`}`;
      const option = new Option(text, String(i));
      option.disabled = !ready;
      return option;
    });
    select.replaceChildren(...options);
    // The default model's latest version, unless one was chosen before.
    const latest = (name) =>
      state.models.reduce(
        (best, m, i) => (m.name === name && (best < 0 || +m.version > +state.models[best].version) ? i : best),
        -1,
      );
    const pick = previous && state.models[+previous] ? +previous : latest(body.default_model);
    if (pick >= 0) select.value = String(pick);
    modelChanged();
    return true;
  }

  function selectedModel() {
    return state.models[+$("model").value] || null;
  }

  // top_k is bounded by the model's class count as well as by the server's max_top_k.
  function modelChanged() {
    const model = selectedModel();
    const classes = model && model.label_count > 0 ? model.label_count : state.maxTopK;
    const input = $("top-k");
    input.max = String(Math.min(classes, state.maxTopK));
    if (+input.value > +input.max) input.value = input.max;
  }

  $("model").addEventListener("change", () => {
    modelChanged();
    if (state.file) classify();
  });
  $("tta").addEventListener("change", () => state.file && classify());

  // ---------------------------------------------------------------------------------------- the image

  function choose(file) {
    if (!file) return;
    state.file = file;
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = URL.createObjectURL(file);
    $("preview").src = state.previewUrl;
    $("filename").textContent = `${file.name || "pasted image"} · ${megabytes(file.size)}`;
    $("view").hidden = false;
    $("result").hidden = true;
    classify();
  }

  $("file").addEventListener("change", (event) => choose(event.target.files[0]));

  const drop = $("drop");
  for (const kind of ["dragenter", "dragover"]) {
    drop.addEventListener(kind, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const kind of ["dragleave", "drop"]) {
    drop.addEventListener(kind, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    choose(event.dataTransfer.files[0]);
  });
  // A dropped file outside the zone must not make the browser open it in place of the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  document.addEventListener("paste", (event) => {
    if (event.target === $("token")) return;
    const files = [...((event.clipboardData && event.clipboardData.files) || [])];
    const file = files.find((f) => f.type.startsWith("image/")) || files[0];
    if (file) {
      event.preventDefault();
      choose(file);
    }
  });

  // --------------------------------------------------------------------------------------- classify

  function render(body, milliseconds) {
    const list = $("predictions");
    list.replaceChildren(
      ...body.predictions.map((p) => {
        const item = document.createElement("li");
        const label = document.createElement("div");
        label.className = "label";
        const name = document.createElement("span");
        name.className = "name";
        name.textContent = p.label;
        const probability = document.createElement("span");
        probability.className = "probability";
        probability.textContent = `${(p.probability * 100).toFixed(1)}%`;
        label.append(name, probability);
        const bar = document.createElement("div");
        bar.className = "bar";
        bar.setAttribute("aria-hidden", "true");
        const fill = document.createElement("span");
        fill.style.width = `${Math.max(0, Math.min(1, p.probability)) * 100}%`;
        bar.append(fill);
        item.append(label, bar);
        return item;
      }),
    );
    $("meta").textContent =
      `${body.model}, version ${body.version} · ${Math.round(milliseconds)} ms · request ${body.request_id}`;
    $("result").hidden = false;
    const top = body.predictions[0];
    status(top ? `Done: ${top.label}, ${(top.probability * 100).toFixed(1)}%.` : "Done.");
  }

  async function classify() {
    if (!state.file) {
      showError("Choose an image first.");
      $("file").focus();
      return;
    }
    if (state.busy) return;
    const model = selectedModel();
    if (!model) {
      showError("No model to classify with: reload the page.");
      return;
    }
    if (state.maxBytes !== null && state.file.size > state.maxBytes) {
      showError(plainWords({ code: "request_too_large" }));
      $("result").hidden = true;
      return;
    }
    const topK = $("top-k");
    if (!topK.checkValidity()) {
      showError(`Classes shown must be a whole number from 1 to ${topK.max}.`);
      topK.focus();
      return;
    }
    const query = new URLSearchParams({
      model: model.name,
      version: model.version,
      top_k: topK.value,
      tta: $("tta").value,
    });
    state.busy = true;
    $("classify").disabled = true;
    showError("");
    status(`Classifying with ${model.name}…`);
    const started = performance.now();
    try {
      const response = await call(`classify?${query}`, {
        method: "POST",
        body: state.file,
        headers: { "Content-Type": state.file.type || "application/octet-stream" },
      });
      const elapsed = performance.now() - started;
      if (unauthorized(response)) {
        $("result").hidden = true;
        return;
      }
      if (!response.ok) {
        $("result").hidden = true;
        showError(plainWords(await errorOf(response), model.name));
        return;
      }
      render(await response.json(), elapsed);
    } catch (_) {
      $("result").hidden = true;
      showError("Could not reach the server.");
    } finally {
      state.busy = false;
      $("classify").disabled = false;
    }
  }

  $("classify-form").addEventListener("submit", (event) => {
    event.preventDefault();
    classify();
  });

  // ------------------------------------------------------------------------------------------- start

  async function start() {
    try {
      if (!(await loadDescription())) return false;
    } catch (_) {
      // the document is a convenience: the defaults serve without it
    }
    return loadModels();
  }

  start();
})();
