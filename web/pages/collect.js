// Collect: search Unsplash and Pexels (POST /v1/collect/search), pick results, and import them
// into a dataset with tags (POST /v1/datasets/{id}/collect, a job followed to its end).
// Thumbnails are the sources' own URLs (their guidelines ask for hotlinking), each with its credit.

import { api, followJob } from "../api.js";
import { $, alertBox, clearError, el, field, showError } from "../ui.js";

let results = []; // the last search's results
const chosen = new Set(); // result ids picked

export function init(section) {
  const search = el("form", { novalidate: true, class: "panel form", id: "co-form", onsubmit: runSearch },
    el("h2", {}, "Search"),
    el("p", { id: "co-sources", class: "muted" }, "Loading sources…"),
    el("div", { class: "row three" },
      field("Query", el("input", { id: "co-query", type: "search", maxlength: "200", placeholder: "red fox in snow" })),
      field("Per page", el("input", { id: "co-per-page", type: "number", min: "1", max: "80", value: "20" })),
      field("Orientation", el("select", { id: "co-orientation" },
        el("option", { value: "" }, "Any"), el("option", { value: "landscape" }, "Landscape"),
        el("option", { value: "portrait" }, "Portrait"), el("option", { value: "square" }, "Square"))),
      field("Colour", el("select", { id: "co-colour" }, el("option", { value: "" }, "Any")),
        "The colours every checked source filters by.")),
    el("div", { class: "actions" },
      el("button", { id: "co-search", type: "submit", class: "primary" }, "Search"),
      el("button", { id: "co-more", type: "button", hidden: true, onclick: () => runSearch(null, true) }, "Next page")),
    el("p", { id: "co-rate", class: "muted", role: "status" }),
    alertBox("co-error"));
  const grid = el("div", { class: "panel" },
    el("div", { class: "panel-head" }, el("h2", {}, "Results"), el("span", { id: "co-count", class: "muted" })),
    el("ul", { id: "co-results", class: "co-grid" }));
  const importer = el("form", { novalidate: true, class: "panel form", id: "co-import-form", onsubmit: runImport },
    el("h2", {}, "Import the selected"),
    field("Into dataset", el("select", { id: "co-dataset" })),
    field("Or a new dataset", el("input", { id: "co-new-dataset", type: "text", maxlength: "100",
      pattern: "[A-Za-z0-9_\\-][A-Za-z0-9_.\\-]*", placeholder: "foxes" }), "Letters, digits, _ . -"),
    field("Tags", el("input", { id: "co-tags", type: "text", placeholder: "fox, winter" }), "Comma-separated."),
    el("div", { class: "actions" }, el("button", { id: "co-import", type: "submit", class: "primary" }, "Import")),
    el("p", { id: "co-progress", role: "status" }),
    el("ul", { id: "co-rejections", class: "muted", hidden: true }),
    alertBox("co-import-error"));
  section.append(el("div", { class: "layout" }, el("div", { class: "stack" }, search, importer),
    el("div", { class: "stack" }, grid)));
}

export function show() {
  loadSources();
  loadDatasets();
}

let page = 1;
let sourceList = []; // GET /v1/collect/sources

// The colour select offers what every checked source can filter by (a source refuses a colour it
// does not know, with a 400 naming `color`).
function fillColours() {
  const select = $("#co-colour");
  const before = select.value;
  const checked = sourceList.filter((s) => $(`#co-src-${s.name}`)?.checked);
  const common = checked.length ? checked.map((s) => s.colors || [])
    .reduce((all, colours) => all.filter((c) => colours.includes(c))) : [];
  select.replaceChildren(el("option", { value: "" }, "Any"),
    ...common.map((c) => el("option", { value: c }, c.replaceAll("_", " "))));
  select.value = common.includes(before) ? before : "";
}

async function loadSources() {
  const box = $("#co-sources");
  try {
    const { data } = await api("GET", "/v1/collect/sources");
    sourceList = data;
    box.replaceChildren(...data.map((s) => el("span", { class: "co-source" },
      el("input", { type: "checkbox", id: `co-src-${s.name}`, value: s.name, checked: s.available,
        disabled: !s.available, onchange: fillColours }),
      el("label", { for: `co-src-${s.name}`, title: s.license_summary }, ` ${s.name} `),
      el("small", {}, s.available ? `(${s.license}, up to ${s.max_per_page} a page) ` : `(unavailable: ${s.reason}) `))));
    fillColours();
  } catch (err) {
    showError($("#co-error"), err);
  }
}

async function loadDatasets(selected) {
  try {
    const { data } = await api("GET", "/v1/datasets");
    const select = $("#co-dataset");
    const before = selected || select.value;
    select.replaceChildren(el("option", { value: "" }, data.length ? "Choose a dataset" : "No datasets yet"),
      ...data.map((d) => el("option", { value: d.id }, `${d.name} (${d.images} images)`)));
    if (data.some((d) => d.id === before)) select.value = before;
  } catch (err) {
    showError($("#co-import-error"), err);
  }
}

async function runSearch(event, next = false) {
  event?.preventDefault();
  const error = $("#co-error");
  clearError(error);
  page = next ? page + 1 : 1;
  const sources = [...document.querySelectorAll("#co-sources input:checked")].map((i) => i.value);
  const body = { query: $("#co-query").value, page, per_page: Number($("#co-per-page").value) || 20 };
  if (sources.length) body.sources = sources;
  const orientation = $("#co-orientation").value;
  if (orientation) body.orientation = orientation;
  const colour = $("#co-colour").value;
  if (colour) body.color = colour;
  const button = $("#co-search");
  button.disabled = true;
  try {
    const found = await api("POST", "/v1/collect/search", { json: body });
    results = found.data;
    showResults();
    $("#co-more").hidden = !Object.values(found.sources).some((s) => s.total_pages && s.total_pages > page);
    $("#co-rate").textContent = Object.entries(found.sources).map(([name, s]) =>
      `${name}: ${s.total} found, ${s.rate_limit.remaining ?? "?"} requests left` +
      (s.rate_limit.reset_at ? ` (until ${new Date(s.rate_limit.reset_at * 1000).toLocaleTimeString()})` : ""))
      .join(" · ") +
      found.errors.map((e) => ` · ${e.source} failed: ${e.message}`).join("");
  } catch (err) {
    showError(error, err);
  } finally {
    button.disabled = false;
  }
}

function showResults() {
  $("#co-count").textContent = `${results.length} shown, ${chosen.size} selected`;
  $("#co-results").replaceChildren(...results.map((r) => {
    const id = `co-pick-${r.id.replace(/[^A-Za-z0-9_-]/g, "_")}`;
    const box = el("input", { type: "checkbox", id, checked: chosen.has(r.id), dataset: { result: r.id },
      onchange: (e) => {
        if (e.target.checked) chosen.add(r.id);
        else chosen.delete(r.id);
        $("#co-count").textContent = `${results.length} shown, ${chosen.size} selected`;
      } });
    return el("li", { class: "co-item" },
      el("label", { for: id },
        el("img", { src: r.thumbnail_url, alt: r.description || `Photo by ${r.photographer}`, loading: "lazy",
          referrerpolicy: "no-referrer" })),
      el("div", { class: "co-meta" }, box,
        el("small", {}, "Photo by ", el("a", { href: r.photographer_url, target: "_blank", rel: "noopener" },
          r.photographer || "unknown"), " on ", el("a", { href: r.page_url, target: "_blank", rel: "noopener" },
          r.source), ` · ${r.width}×${r.height} · ${r.license}`)));
  }));
}

async function runImport(event) {
  event.preventDefault();
  const error = $("#co-import-error");
  const progress = $("#co-progress");
  clearError(error);
  progress.textContent = "";
  const rejections = $("#co-rejections");
  rejections.hidden = true;
  if (!chosen.size) return showError(error, "Select at least one result to import.");
  const button = $("#co-import");
  button.disabled = true;
  try {
    let datasetId = $("#co-dataset").value;
    const name = $("#co-new-dataset").value.trim();
    if (name) {
      datasetId = (await api("POST", "/v1/datasets", { json: { name } })).id;
      $("#co-new-dataset").value = "";
    }
    if (!datasetId) throw new Error("Choose a dataset, or name a new one.");
    const tags = $("#co-tags").value.split(",").map((t) => t.trim()).filter(Boolean);
    const job = await api("POST", `/v1/datasets/${encodeURIComponent(datasetId)}/collect`,
      { json: { result_ids: [...chosen], tags } });
    const final = await followJob(job.id, (j) => {
      progress.textContent = `Importing: ${j.status}, ${Math.round(j.progress || 0)}%`;
    });
    const r = final.result || {};
    if (final.status === "completed") chosen.clear();
    showResults();
    await loadDatasets(datasetId); // first, so the dataset select shows it once the outcome does
    progress.textContent = final.status === "completed"
      ? `Imported ${r.added} image${r.added === 1 ? "" : "s"} into version ${r.version} (${r.images} in all); ` +
        `${r.duplicates} duplicate${r.duplicates === 1 ? "" : "s"}, ${r.rejected} rejected.`
      : `The import ${final.status}${final.error ? `: ${final.error.message}` : ""}.`;
    // each item that did not land, with why (a download that failed, a host off the source's list)
    rejections.replaceChildren(...(r.rejections || []).map((x) => el("li", {}, `${x.filename}: ${x.reason}`)));
    rejections.hidden = !(r.rejections || []).length;
  } catch (err) {
    showError(error, err);
  } finally {
    button.disabled = false;
  }
}
