// FieldScope live page: poll the status API, update bars and meters, capture and upload.
"use strict";
(function () {
  const $ = (sel) => document.querySelector(sel);
  const csrf = () => document.querySelector('meta[name="csrf-token"]').content;
  const pct = (x) => (100 * x).toFixed(0) + "%";

  // The page was drawn for one profile (its model's labels, its focus minimum): when the kit
  // runs another (switched here or from another browser), draw it again.
  const drawnFor = $("#profiles") ? $("#profiles").dataset.active : null;

  function show(data) {
    if (drawnFor !== null && data.profile && data.profile.id !== drawnFor) {
      location.reload();
      return;
    }
    const lost = $("#camera-lost");
    if (lost) lost.hidden = data.camera.state === "ok" || data.camera.state === "finished";
    const r = data.last_result;
    const box = $("#decision");
    if (!box) return;
    if (r && r.assessable === false) {
      // Out of scope (nothing the model is for in view) or a failed quality gate.
      const away = r.scope && r.scope.in_scope === false;
      const what = r.reason || "nothing to classify in view";
      box.textContent = away ? what.charAt(0).toUpperCase() + what.slice(1) : "Not assessable";
      box.className = "decision na";
      $("#quality-note").textContent = away ? "" : r.reason || "";
    } else if (r) {
      // The shown state is the smoothed one (last N frames, held before it changes).
      const d = data.smoothed && data.smoothed.decision ? data.smoothed.decision : r.decision;
      box.textContent = d ? d.text : r.label + " " + r.score.toFixed(2);
      box.className = "decision " + (d ? (d.positive ? "positive" : "negative") : "");
      $("#quality-note").textContent = "";
      const smooth = data.smoothed ? data.smoothed.probabilities : r.probabilities;
      $("#result-label").textContent = "Now: " + (data.smoothed ? data.smoothed.label : r.label);
      document.querySelectorAll(".bar").forEach((bar) => {
        const p = smooth[bar.dataset.label] || 0;
        bar.querySelector(".fill").style.width = pct(p);
        bar.querySelector(".value").textContent = pct(p);
      });
    }
    if (data.quality) {
      // Scaled so the kit's minimum focus sits in the middle of the bar.
      const meter = $("#focus-meter");
      const minFocus = meter ? parseFloat(meter.dataset.minFocus) || 1 : 1;
      const f = Math.min(1, data.quality.focus / (2 * minFocus));
      $("#focus-fill").style.width = pct(f);
      $("#focus-value").textContent = data.quality.focus.toFixed(0);
    }
    $("#fps").textContent = data.fps.toFixed(1);
    $("#latency").textContent = data.latency_ms === null ? "–" : data.latency_ms.toFixed(0);
    $("#backend").textContent = data.backend.backend;
  }

  // The live view: an MJPEG <img>. It reconnects when its stream fails (503 when too many
  // viewers, the kit restarting) and whenever the status API comes back after an outage
  // (a restarted daemon ends the old stream without the browser noticing).
  const live = $("#stream");
  let streamRetry = null;
  function reconnectStream(delay) {
    if (!live || streamRetry) return;
    streamRetry = setTimeout(() => {
      streamRetry = null;
      live.src = live.dataset.src + "?t=" + Date.now();
    }, delay);
  }
  if (live) {
    live.dataset.src = live.getAttribute("src").split("?")[0];
    live.addEventListener("error", () => reconnectStream(3000));
  }

  let down = false;
  async function poll() {
    try {
      const resp = await fetch("/api/status", { headers: { Accept: "application/json" } });
      if (resp.ok) {
        show(await resp.json());
        if (down) reconnectStream(0);
        down = false;
      } else {
        down = true; // 401 (logged out) or an error: what is shown is no longer current
      }
    } catch (e) {
      down = true; // the kit restarts or the Wi-Fi dropped: try again
    }
    const stale = $("#stale");
    if (stale) stale.hidden = !down;
    const box = $("#decision");
    if (box) box.classList.toggle("stale", down);
    setTimeout(poll, 1000);
  }

  function report(text, bad) {
    const el = $("#action-result");
    el.textContent = text;
    el.className = bad ? "note bad" : "note";
  }

  async function post(url, body, isJson) {
    const headers = { "X-CSRFToken": csrf(), Accept: "application/json" };
    if (isJson) headers["Content-Type"] = "application/json";
    const resp = await fetch(url, { method: "POST", headers, body });
    // Not every answer is the app's JSON: the server itself refuses a body over the upload
    // limit (413, plain text) before the app sees it.
    const text = await resp.text();
    let data;
    try { data = JSON.parse(text); } catch (e) {
      data = { error: resp.status === 413 ? "the image is larger than the kit accepts (HTTP 413)"
        : "HTTP " + resp.status + " " + (text.split("\n")[0] || resp.statusText) };
    }
    if (!resp.ok) throw new Error(data.error || resp.statusText);
    return data;
  }

  function describe(d) {
    // No label or score for a field without a finding (out of scope, failed the quality gate).
    const what = d.assessable === false
      ? (d.decision ? d.decision.text : "not assessable" + (d.quality && d.quality.reason ? ": " + d.quality.reason : ""))
      : d.label + " " + d.score.toFixed(2) + (d.decision ? " — " + d.decision.text : "");
    return "#" + d.id + ": " + what + (d.sample_code ? " (sample " + d.sample_code + ")" : "");
  }

  // The sample code survives the page being drawn again (a profile switch reloads it).
  const codeInput = $("#sample-code");
  if (codeInput) {
    codeInput.value = sessionStorage.getItem("fieldscope-sample") || "";
    codeInput.addEventListener("input", () => sessionStorage.setItem("fieldscope-sample", codeInput.value));
  }

  const cap = $("#capture-form");
  if (cap) cap.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const d = await post("/api/capture", JSON.stringify({ sample_code: $("#sample-code").value }), true);
      report("Stored " + describe(d));
    } catch (e) { report("Capture failed: " + e.message, true); }
  });

  const up = $("#upload-form");
  if (up) up.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const file = $("#upload-file").files[0];
    // Said here, before sending: the server refuses a larger body at once, and a browser
    // still sending it may see only a broken connection.
    const maxMb = Number(up.dataset.maxMb);
    if (file && maxMb && file.size > maxMb * 1024 * 1024) {
      report("Upload failed: the image is " + (file.size / 1048576).toFixed(1) +
        " MB; the kit accepts up to " + maxMb + " MB", true);
      return;
    }
    const form = new FormData();
    form.append("image", file);
    const code = $("#sample-code") && $("#sample-code").value;
    if (code) form.append("sample_code", code);
    try { report("Stored " + describe(await post("/api/classify", form, false))); }
    catch (e) { report("Upload failed: " + e.message, true); }
  });

  if ($("#decision")) poll();

  // Sample page: show where the model looked over each field (or the plain images).
  const mapKind = $("#map-kind");
  if (mapKind) {
    mapKind.addEventListener("change", () => {
      document.querySelectorAll("img[data-map]").forEach((img) => {
        if (!img.dataset.plain) img.dataset.plain = img.src;
        img.src = mapKind.value ? img.dataset.map + "?kind=" + mapKind.value : img.dataset.plain;
      });
    });
  }
})();
