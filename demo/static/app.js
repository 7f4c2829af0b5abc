// The demo store's page: search, a product with its cache status and stamp, an edit of its price,
// and the pipeline's live counts. It talks only to the store app's /api routes.
"use strict";

const $ = (id) => document.getElementById(id);

function text(tag, value, cls) {
  const el = document.createElement(tag);
  el.textContent = value;
  if (cls) el.className = cls;
  return el;
}

function money(price) {
  return price == null ? "–" : "$" + Number(price).toFixed(2);
}

function when(ms) {
  return ms == null ? "–" : `${ms} (${new Date(ms).toISOString().replace("T", " ").slice(0, 23)} UTC)`;
}

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.message || body.error || response.statusText);
  return body;
}

async function search(event) {
  if (event) event.preventDefault();
  const q = $("q").value.trim();
  const mode = $("mode").value;
  const list = $("results");
  list.replaceChildren();
  if (!q) return;
  $("search-info").textContent = "searching...";
  try {
    const found = await api(`/api/search?q=${encodeURIComponent(q)}&mode=${mode}`);
    for (const r of found.results) {
      const item = document.createElement("li");
      item.dataset.id = r.id;
      const left = document.createElement("div");
      left.append(text("div", r.title, "title"));
      const ranks = Object.entries(r.ranks).map(([leg, rank]) => `${leg} #${rank}`).join(", ");
      left.append(text("div", `${r.category} · score ${r.score} · ${ranks}`, "meta score"));
      item.append(left, text("div", money(r.price), "price"));
      item.addEventListener("click", () => openProduct(r.id));
      list.append(item);
    }
    const scoring = { hybrid: "RRF of vector and BM25 ranks", vector: "cosine similarity", bm25: "BM25" }[mode];
    $("search-info").textContent = `${found.results.length} results (${scoring}); stable_as_of ${when(found.stable_as_of)}`
      + (found.notes.length ? " — " + found.notes.join("; ") : "");
    $("search-info").dataset.count = found.results.length;
  } catch (e) {
    $("search-info").textContent = "search failed: " + e.message;
  }
}

async function openProduct(id) {
  const panel = $("product");
  panel.className = "";
  try {
    const p = await api(`/api/products/${encodeURIComponent(id)}`);
    const a = p.attributes;
    const dl = document.createElement("dl");
    const row = (label, value, elId) => {
      const dd = value instanceof Node ? value : text("dd", value);
      if (!(value instanceof Node)) dd.id = elId || "";
      dl.append(text("dt", label), dd);
    };
    const badge = document.createElement("dd");
    const cache = text("span", p.cache || "none", "badge " + (p.cache || ""));
    cache.id = "cache-status";
    badge.append(cache, text("span", "  (x-layer-cache of GET /v2/namespaces/…/documents/" + p.id + ")", "note"));
    row("id", p.id, "product-id");
    row("category", a.category, "product-category");
    row("price", money(p.price), "product-price");
    row("cache", badge);
    row("_hevlayer_upserted_at", when(p.upserted_at), "upserted-at");
    const form = document.createElement("form");
    form.id = "price-form";
    const input = document.createElement("input");
    input.type = "text";
    input.id = "price-input";
    input.value = p.price == null ? "" : Number(p.price).toFixed(2);
    const save = text("button", "Edit price", "primary");
    save.id = "price-save";
    save.type = "submit";
    form.append(input, save);
    form.addEventListener("submit", (event) => editPrice(event, p.id));
    panel.replaceChildren(text("h3", a.title, ""), text("p", a.description, ""), dl, form,
      text("div", "", "note"));
    panel.querySelector("h3").id = "product-title";
    panel.lastChild.id = "price-result";
    panel.dataset.id = p.id;
  } catch (e) {
    panel.replaceChildren(text("div", "fetch failed: " + e.message, "error"));
  }
}

async function editPrice(event, id) {
  event.preventDefault();
  const price = $("price-input").value;
  try {
    const written = await api(`/api/products/${encodeURIComponent(id)}/price`, {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ price }),
    });
    await openProduct(id);  // fetched again through the gateway: the new price shows at once
    $("price-result").textContent = `patch_rows: ${written.message} (${written.rows_affected} row)`;
  } catch (e) {
    $("price-result").textContent = "edit failed: " + e.message;
  }
}

async function refreshPipeline() {
  try {
    const s = await api("/api/pipeline");
    for (const stage of ["pending", "embedding", "indexed", "failed"]) {
      $("count-" + stage).textContent = s.counts ? s.counts[stage] : "–";
    }
    const p = s.progress;
    $("pipeline-status").textContent = s.status || "–";
    $("pipeline-progress").textContent = `run ${p.run}: ${p.staged}/${s.products} staged, ${p.embedded} embedded, `
      + `${p.batches} batches` + (p.running ? " (running)" : " (done)");
    $("stable-as-of").textContent = when(s.stable_as_of);
    $("embedder").textContent = s.embedder;
    $("pipeline-error").textContent = p.error || "";
  } catch (e) {
    $("pipeline-error").textContent = "status failed: " + e.message;
  }
}

$("search-form").addEventListener("submit", search);
$("rerun").addEventListener("click", () => api("/api/pipeline/run", { method: "POST" }).catch(() => {}));
refreshPipeline();
setInterval(refreshPipeline, 700);
