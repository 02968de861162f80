// fashionlens page: upload a photo, see the matching items and why. No external assets.
"use strict";
const $ = (id) => document.getElementById(id);
let photo = null;
let info = null;

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function el(tag, attrs, children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children || []) node.appendChild(c);
  return node;
}

function chip(text, kind) { return el("span", { class: "chip" + (kind ? " " + kind : ""), text }); }

async function loadInfo() {
  const r = await fetch("/api/info");
  info = await r.json();
  $("catalog-info").textContent = `${info.items.toLocaleString()} items` + (info.attributes.length ? `, ${info.attributes.length} attributes` : "");
  $("k").value = info.default_k; $("k").max = info.max_k;
  if (!info.attributes.length) { $("explain").checked = false; $("explain").disabled = true; return; }
  $("wants-box").hidden = false;
  for (const a of info.attributes) {
    const select = el("select", { "data-attribute": a.name, "aria-label": a.name });
    select.appendChild(el("option", { value: "", text: "any" }));
    for (const v of a.values) select.appendChild(el("option", { value: v, text: v }));
    $("wants").append(el("label", { text: a.name }), select);
  }
}

function setPhoto(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) { status(`${file.name}: not an image`, true); return; }
  photo = file;
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  $("search").disabled = false;
  search();
}

async function search(event) {
  if (event) event.preventDefault();
  if (!photo) return;
  const form = new FormData();
  form.append("image", photo, photo.name || "photo.jpg");
  form.append("k", $("k").value);
  form.append("explain", $("explain").checked ? "true" : "false");
  for (const f of $("filter").value.split(",").map((s) => s.trim()).filter(Boolean)) form.append("filter", f);
  for (const s of document.querySelectorAll("#wants select")) if (s.value) form.append("want", `${s.dataset.attribute}=${s.value}`);
  status("searching ...");
  $("search").disabled = true;
  try {
    const r = await fetch("/api/search", { method: "POST", body: form });
    const body = await r.json();
    if (!r.ok) { status(body.error || `error ${r.status}`, true); return; }
    status(`${body.results.length} results in ${(body.seconds * 1000).toFixed(0)} ms`);
    showQuery(body.query);
    showResults(body.results);
  } catch (e) {
    status(`the server cannot be reached (${e})`, true);
  } finally {
    $("search").disabled = false;
  }
}

function confident(attributes) {
  return attributes.filter((a) => a.confidence >= 0.5 && a.value !== "no" && !a.value.includes("invisible"));
}

// The box a photo was cut to before it was embedded (--crop): an SVG over the image whose viewBox is
// the photo's own pixels; "meet" places it as object-fit: contain places the image.
function cropOverlay(crop) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "crop");
  if (!crop || crop.method === "whole") { svg.setAttribute("hidden", ""); return svg; }
  const [x0, y0, x1, y1] = crop.box;
  svg.setAttribute("viewBox", `0 0 ${crop.size[0]} ${crop.size[1]}`);
  svg.setAttribute("preserveAspectRatio", "xMidYMid meet");
  const rect = document.createElementNS(ns, "rect");
  for (const [k, v] of Object.entries({ x: x0, y: y0, width: x1 - x0, height: y1 - y0 })) rect.setAttribute(k, v);
  const title = document.createElementNS(ns, "title");
  title.textContent = `embedded: the ${crop.region} (found by ${crop.method})`;
  rect.appendChild(title);
  svg.appendChild(rect);
  return svg;
}

function showQuery(query) {
  $("query-crop").replaceWith(Object.assign(cropOverlay(query.crop), { id: "query-crop" }));
  const box = $("query-attributes");
  box.replaceChildren();
  for (const a of confident(query.attributes || [])) box.appendChild(chip(a.phrase || a.value));
}

function showResults(results) {
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of results) {
    const chips = el("div", { class: "chips" }, confident(hit.attributes).slice(0, 4).map((a) => chip(a.phrase)));
    const card = el("article", { class: "card", tabindex: "0", "data-id": hit.id }, [
      el("div", { class: "framed" }, [el("img", { src: hit.thumbnail, alt: hit.id, loading: "lazy" }), cropOverlay(hit.crop)]),
      el("div", {}, [el("span", { class: "id", text: hit.id }), el("span", { class: "score", text: hit.score.toFixed(3) })]),
      chips,
      el("div", { class: "reason", text: (hit.reasons && hit.reasons.text) || "" }),
    ]);
    card.addEventListener("click", () => showDetail(hit));
    card.addEventListener("keydown", (e) => { if (e.key === "Enter") showDetail(hit); });
    grid.appendChild(card);
  }
}

function showDetail(hit) {
  const reasons = hit.reasons || {};
  const meta = el("dl", {}, Object.entries(hit.metadata).flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
  // values present first: "round neckline" says more than "no collar"
  const present = (r) => (r.value === "no" || r.item_value === "no" ? 1 : 0);
  const sameSorted = [...(reasons.same || [])].sort((a, b) => present(a) - present(b));
  const same = sameSorted.map((r) => chip(r.phrase, "same"));
  const differs = (reasons.differs || []).map((r) => chip(`${r.attribute.replace(/_labels$/, "").replace(/_/g, " ")}: ${r.query_value} vs ${r.item_value}`, "differs"));
  const wanted = (reasons.wanted || []).map((r) => chip(r.phrase, "same"));
  const shown = [...(reasons.wanted || []), ...(reasons.differs || []), ...sameSorted].map((r) => r.attribute);
  const names = [...new Set(shown.length ? shown : confident(hit.attributes).map((a) => a.attribute))].slice(0, 6);
  const overlays = el("div", { class: "overlays" }, names.map((name) => {
    const a = hit.attributes.find((x) => x.attribute === name);
    const caption = a ? `${a.name}: ${a.value} (${a.confidence.toFixed(2)})` : name;
    return el("figure", {}, [el("img", { src: `${hit.url}/explanation?attribute=${encodeURIComponent(name)}`, alt: caption, class: "overlay" }),
                             el("figcaption", { text: caption })]);
  }));
  $("detail-body").replaceChildren(
    el("h2", { text: `${hit.id} (score ${hit.score.toFixed(3)})` }),
    el("div", { class: "detail-main" }, [el("img", { src: hit.image, alt: hit.id }), meta]),
    el("p", { class: "reason-text", text: reasons.text || "" }),
    el("div", { class: "chips" }, [...wanted, ...same, ...differs]),
    names.length ? el("h3", { text: "where the model looked" }) : el("span"),
    overlays,
  );
  $("detail").showModal();
}

$("file").addEventListener("change", (e) => setPhoto(e.target.files[0]));
$("camera").addEventListener("change", (e) => setPhoto(e.target.files[0]));
$("options").addEventListener("submit", search);
$("close").addEventListener("click", () => $("detail").close());
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); setPhoto(e.dataTransfer.files[0]); });
document.addEventListener("paste", (e) => { const f = [...e.clipboardData.files][0]; if (f) setPhoto(f); });
loadInfo().catch((e) => status(`cannot load the catalog's description (${e})`, true));
