// Anomaly report: threshold slider, filters, keyboard navigation and the image viewer.
// Reads window.ANOMALY_REPORT (report-data.js); items are sorted by descending score, so the images
// flagged at a threshold t (score >= t, as in DetectionResult) are always a prefix of the list.
"use strict";
(() => {
  const D = window.ANOMALY_REPORT;
  const items = D.items;
  const n = items.length;
  const scores = items.map((it) => it.score);
  const $ = (id) => document.getElementById(id);

  // anomalous[i] = anomalous images among the first i: confusion counts at any threshold in O(1)
  const anomalous = new Int32Array(n + 1);
  for (let i = 0; i < n; i++) anomalous[i + 1] = anomalous[i] + (items[i].label === 1 ? 1 : 0);
  const nPos = anomalous[n];
  const nNeg = D.hasLabels ? n - nPos : 0;

  /** Number of images with score >= t (binary search over the descending scores). */
  function flaggedCount(t) {
    let lo = 0;
    let hi = n;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (scores[mid] >= t) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  const fmt = (v) => String(Number(v.toPrecision(4)));
  const pct = (num, den) => (den ? `${((100 * num) / den).toFixed(1)} % (${num}/${den})` : "–");
  const setText = (id, text) => {
    const el = $(id);
    if (el) el.textContent = text;
  };

  const cards = Array.from(document.querySelectorAll("#grid > li"));
  const range = $("thr-range");
  const number = $("thr-value");
  const modelK = flaggedCount(D.threshold);
  let k = modelK;
  let threshold = D.threshold;

  function paintCard(i) {
    const flagged = i < k;
    const card = cards[i];
    card.classList.toggle("is-flagged", flagged);
    card.classList.toggle("is-changed", flagged !== i < modelK);
    if (D.hasLabels) card.classList.toggle("is-wrong", flagged !== (items[i].label === 1));
    card.querySelector(".verdict").textContent = flagged ? "Flagged" : "Passed";
  }

  function setThreshold(t, source) {
    if (!Number.isFinite(t)) return;
    threshold = t;
    const next = flaggedCount(t);
    const [a, b] = next < k ? [next, k] : [k, next];
    k = next;
    for (let i = a; i < b; i++) paintCard(i);
    if (source !== range) range.value = String(t);
    if (source !== number) number.value = String(t);
    renderStats();
    renderHistogramLine();
    renderChanges();
    if ($("filter-verdict").value) applyFilters();
    if (viewer.open) fillViewer();
  }

  function renderStats() {
    setText("n-flagged", String(k));
    setText("rate-flagged", pct(k, n));
    setText("rate-passed", pct(n - k, n));
    if (!D.hasLabels) return;
    const tp = anomalous[k];
    const fp = k - tp;
    const fn = nPos - tp;
    const tn = nNeg - fp;
    setText("cm-tp", String(tp));
    setText("cm-fp", String(fp));
    setText("cm-fn", String(fn));
    setText("cm-tn", String(tn));
    setText("rate-tpr", pct(tp, nPos));
    setText("rate-fpr", pct(fp, nNeg));
    setText("rate-precision", pct(tp, k));
    setText("rate-accuracy", pct(tp + tn, n));
    setText("tpr-inline", nPos ? `${((100 * tp) / nPos).toFixed(1)} %` : "–");
    setText("fpr-inline", nNeg ? `${((100 * fp) / nNeg).toFixed(1)} %` : "–");
  }

  const hist = $("histogram");
  function renderHistogramLine() {
    const lo = Number(hist.dataset.lo);
    const hi = Number(hist.dataset.hi);
    const p0 = Number(hist.dataset.px0);
    const p1 = Number(hist.dataset.px1);
    const t = Math.min(Math.max(threshold, lo), hi);
    const x = p0 + ((t - lo) / (hi - lo || 1)) * (p1 - p0);
    $("hist-threshold").setAttribute("transform", `translate(${x.toFixed(2)},0)`);
  }

  const MAX_CHANGES = 60;
  function renderChanges() {
    const list = $("changes-list");
    list.replaceChildren();
    const more = k > modelK;
    const [a, b] = more ? [modelK, k] : [k, modelK];
    const count = b - a;
    const what = more ? "newly flagged" : "no longer flagged";
    setText(
      "changes-summary",
      count ? `${count} image${count === 1 ? "" : "s"} ${what} (model threshold ${fmt(D.threshold)}).` : "Same decisions as at the model threshold."
    );
    for (let i = a; i < Math.min(b, a + MAX_CHANGES); i++) {
      const it = items[i];
      const li = document.createElement("li");
      const btn = document.createElement("button");
      btn.type = "button";
      btn.className = "link-btn";
      btn.dataset.open = String(i);
      btn.textContent = it.name;
      const facts = document.createElement("span");
      facts.className = "muted";
      const truth = it.label === null ? "" : it.label === 1 ? " · defect" : " · good";
      facts.textContent = ` ${fmt(it.score)}${truth}`;
      li.className = more ? "change-in" : "change-out";
      li.append(btn, facts);
      list.append(li);
    }
    if (count > MAX_CHANGES) {
      const li = document.createElement("li");
      li.className = "muted";
      li.textContent = `… and ${count - MAX_CHANGES} more (filter the gallery by “Changed”)`;
      list.append(li);
    }
  }

  // ---- filters ----
  const filterFolder = $("filter-folder");
  const filterVerdict = $("filter-verdict");
  const filterCluster = $("filter-cluster");
  let visible = items.map((_, i) => i);

  function verdictMatches(i, verdict) {
    const flagged = i < k;
    const label = items[i].label;
    switch (verdict) {
      case "flagged": return flagged;
      case "passed": return !flagged;
      case "errors": return label !== null && flagged !== (label === 1);
      case "fp": return flagged && label === 0;
      case "fn": return !flagged && label === 1;
      case "changed": return flagged !== i < modelK;
      default: return true;
    }
  }

  function applyFilters() {
    const folder = filterFolder.value;
    const verdict = filterVerdict.value;
    const cluster = filterCluster ? filterCluster.value : "";
    visible = [];
    for (let i = 0; i < n; i++) {
      const it = items[i];
      const show = (!folder || it.folder === folder) && (!cluster || it.cluster === cluster) && verdictMatches(i, verdict);
      if (cards[i].hidden === show) cards[i].hidden = !show;
      if (show) visible.push(i);
    }
    setText("shown-count", `${visible.length} shown`);
  }

  // ---- keyboard navigation in the gallery ----
  const grid = $("grid");
  function columns() {
    return getComputedStyle(grid).gridTemplateColumns.split(" ").filter(Boolean).length || 1;
  }
  function focusCard(i) {
    const btn = cards[i].querySelector(".thumb");
    btn.focus({ preventScroll: true });
    cards[i].scrollIntoView({ block: "nearest" });
  }
  grid.addEventListener("keydown", (event) => {
    const card = event.target.closest("li.card");
    if (!card || !visible.length) return;
    const pos = visible.indexOf(Number(card.dataset.i));
    const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: columns(), ArrowUp: -columns(), Home: -n, End: n }[event.key];
    if (step === undefined || pos < 0) return;
    event.preventDefault();
    focusCard(visible[Math.min(Math.max(pos + step, 0), visible.length - 1)]);
  });
  grid.addEventListener("click", (event) => {
    const btn = event.target.closest("button.thumb");
    if (btn) openViewer(Number(btn.dataset.i));
  });

  // ---- viewer ----
  const viewer = $("viewer");
  const VIEW_NAMES = { image: "Image", overlay: "Overlay", map: "Anomaly map", mask: "Mask" };
  let current = 0;

  function fact(dl, term, value) {
    const div = document.createElement("div");
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = term;
    dd.textContent = value;
    div.append(dt, dd);
    dl.append(div);
  }

  function fillViewer() {
    const it = items[current];
    const flagged = current < k;
    setText("viewer-title", `#${current + 1} ${it.name}`);
    setText("viewer-path", it.path);
    const facts = $("viewer-facts");
    facts.replaceChildren();
    fact(facts, "Score", fmt(it.score));
    fact(facts, "Verdict", `${flagged ? "Flagged" : "Passed"} at threshold ${fmt(threshold)}`);
    if (it.label !== null) fact(facts, "Ground truth", it.label === 1 ? `Defect (${it.folder})` : "Good");
    if (it.aupimo !== null) fact(facts, "AUPIMO", it.aupimo.toFixed(3));
    if (it.cluster !== null) fact(facts, "Cluster", it.confidence === null ? it.cluster : `${it.cluster} (confidence ${it.confidence.toFixed(2)})`);
    const views = $("viewer-views");
    views.replaceChildren();
    for (const [kind, label] of Object.entries(VIEW_NAMES)) {
      const src = it.views[kind];
      if (!src) continue;
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = src;
      img.width = it.size[0];
      img.height = it.size[1];
      img.alt = `${label} of ${it.name}`;
      const caption = document.createElement("figcaption");
      // The mask is drawn once, at the model's pixel threshold: the slider does not redraw it.
      caption.textContent = kind === "mask" && it.views.map ? `${label} at the model's threshold` : label;
      figure.append(img, caption);
      views.append(figure);
    }
    if (!views.children.length) setText("viewer-views", "No picture available for this image.");
  }

  function openViewer(i) {
    current = i;
    fillViewer();
    if (!viewer.open) viewer.showModal();
  }

  function stepViewer(step) {
    const order = visible.includes(current) ? visible : items.map((_, i) => i);
    const pos = order.indexOf(current);
    current = order[(pos + step + order.length) % order.length];
    fillViewer();
  }

  $("viewer-prev").addEventListener("click", () => stepViewer(-1));
  $("viewer-next").addEventListener("click", () => stepViewer(1));
  $("viewer-close").addEventListener("click", () => viewer.close());
  viewer.addEventListener("click", (event) => {
    if (event.target === viewer) viewer.close(); // a click on the backdrop
  });
  viewer.addEventListener("keydown", (event) => {
    if (event.key === "ArrowRight" || event.key === "ArrowLeft") {
      event.preventDefault();
      stepViewer(event.key === "ArrowRight" ? 1 : -1);
    }
  });
  viewer.addEventListener("close", () => {
    if (!cards[current].hidden) focusCard(current);
  });

  document.addEventListener("click", (event) => {
    const opener = event.target.closest("[data-open]");
    if (opener) openViewer(Number(opener.dataset.open));
    const clusterBtn = event.target.closest("[data-cluster-filter]");
    if (clusterBtn && filterCluster) {
      filterCluster.value = clusterBtn.dataset.clusterFilter;
      applyFilters();
      $("gallery").scrollIntoView();
    }
  });

  // ---- threshold controls ----
  // Chromium keeps 15 significant digits of a range value: a value within that rounding of an image score
  // is taken as that score, so that setting the slider exactly at a score flags that image (score >= t).
  function fromSlider(value) {
    const i = flaggedCount(value);
    return i < n && value - scores[i] <= Math.abs(value) * 1e-14 ? scores[i] : value;
  }
  range.addEventListener("input", () => setThreshold(fromSlider(Number(range.value)), range));
  // valueAsNumber: NaN (ignored) for a field cleared or half typed ("-", "1e"), where Number(value) was 0: all flagged
  number.addEventListener("input", () => setThreshold(number.valueAsNumber, number));
  $("thr-reset").addEventListener("click", () => setThreshold(D.threshold, null));
  // one image more / fewer: the next score down, or halfway to the next score up
  $("thr-down").addEventListener("click", () => {
    if (k < n) setThreshold(scores[k], null);
  });
  $("thr-up").addEventListener("click", () => {
    if (k === 0) return;
    let j = k - 1; // the lowest flagged score; skip its ties to reach the next higher score
    while (j > 0 && scores[j - 1] === scores[k - 1]) j--;
    setThreshold(j > 0 ? (scores[k - 1] + scores[j - 1]) / 2 : Number(range.max), null);
  });
  for (const select of [filterFolder, filterVerdict, filterCluster]) {
    if (select) select.addEventListener("change", applyFilters);
  }

  renderStats();
  renderHistogramLine();
  renderChanges();
  applyFilters();
  document.documentElement.dataset.ready = "true";
})();
