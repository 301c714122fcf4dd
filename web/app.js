// The shell: API key field and hash router. Each page module exports `init(section)`, called
// once, and `show(params)`, called every time its route is shown; page sections are kept (only
// hidden), so a running job keeps its progress while you look at another page.

import { getKey, setKey } from "./api.js";
import { el } from "./ui.js";
import * as generate from "./pages/generate.js";
import * as edit from "./pages/edit.js";
import * as video from "./pages/video.js";
import * as gallery from "./pages/gallery.js";
import * as datasets from "./pages/datasets.js";
import * as collect from "./pages/collect.js";
import * as workflows from "./pages/workflows.js";
import * as presets from "./pages/presets.js";
import * as monitor from "./pages/monitor.js";

const PAGES = {
  generate: { module: generate, title: "Generate" },
  edit: { module: edit, title: "Edit" },
  video: { module: video, title: "Video" },
  gallery: { module: gallery, title: "Gallery" },
  collect: { module: collect, title: "Collect" },
  datasets: { module: datasets, title: "Datasets and training" },
  workflows: { module: workflows, title: "Workflows" },
  presets: { module: presets, title: "Presets" },
  monitor: { module: monitor, title: "Monitor" },
};
const sections = {};

function parseHash() {
  const [path, query = ""] = location.hash.replace(/^#\/?/, "").split("?");
  return { name: path in PAGES ? path : "generate", params: new URLSearchParams(query) };
}

function route() {
  const { name, params } = parseHash();
  const main = document.getElementById("main");
  if (!sections[name]) {
    sections[name] = el("section", { id: `page-${name}`, class: "page", "aria-labelledby": `${name}-title` },
      el("h1", { id: `${name}-title` }, PAGES[name].title));
    main.append(sections[name]);
    PAGES[name].module.init(sections[name]);
  }
  for (const [other, section] of Object.entries(sections)) section.hidden = other !== name;
  for (const link of document.querySelectorAll("nav a")) {
    if (link.getAttribute("href") === `#/${name}`) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${PAGES[name].title} · Atelier`;
  PAGES[name].module.show(params);
}

function setupKey() {
  const input = document.getElementById("api-key");
  input.value = getKey();
  const save = () => {
    setKey(input.value.trim());
    document.body.dataset.hasKey = String(Boolean(input.value.trim()));
  };
  document.getElementById("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    save();
    route(); // reload the current page's data with the new key
  });
  input.addEventListener("change", save); // kept even without pressing Save
}

setupKey();
// The skip link focuses the content without touching the hash, which is the router's.
document.querySelector(".skip").addEventListener("click", (event) => {
  event.preventDefault();
  document.getElementById("main").focus();
});
window.addEventListener("hashchange", route);
route();
