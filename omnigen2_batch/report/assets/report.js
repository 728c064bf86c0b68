// Draws the report's long lists page by page from the inline JSON, so the DOM stays small for
// big runs. Every string from the recipe goes in as text (append/textContent), never as HTML,
// and inside a <bdi> (u below), so right-to-left text or a stray override reorders only itself.
"use strict";
(function () {
  const PAGE = 48;
  const data = JSON.parse(document.getElementById("report-data").textContent);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined) node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }
  const u = (text) => el("bdi", {}, text);  // user text: isolated from the page's own text
  const fmt = (x) => (typeof x === "number" ? x.toFixed(3) : "n/a");
  const scores = (sc) => Object.entries(sc || {}).map(([k, v]) => k + " " + fmt(v)).join(" · ");

  function thumb(src, full, alt, cls) {
    if (!src) return el("div", {class: "missing"}, "no image");
    const img = el("img", {src: src, alt: alt, loading: "lazy", decoding: "async", class: cls || "thumb"});
    return full ? el("a", {href: full, target: "_blank", rel: "noopener"}, img) : img;
  }
  function card(it) {
    const variants = (it.v || []).map((v) => el("div", {class: "variant", "data-rank": v.r},
      thumb(v.t, v.f, it.n + " v" + v.r), "v" + v.r));
    return el("figure", {class: "card " + it.s, "data-job": it.id},
      variants.length ? el("div", {class: "variants"}, el("div", {class: "variant", "data-rank": 1},
        thumb(it.t, it.f, it.n), "v1"), ...variants) : thumb(it.t, it.f, it.n),
      el("figcaption", {},
        el("b", {}, u(it.n)), " ", el("span", {class: "badge " + it.s}, it.s),
        el("div", {class: "prompt", title: it.p}, u(it.p)),
        el("div", {class: "scores"}, scores(it.sc))));
  }
  function row(cells, job) {
    return el("tr", {"data-job": job}, ...cells.map((c) => (c instanceof Node && c.tagName === "TD" ? c : el("td", {}, c))));
  }
  function table(headings, cls) {
    const body = el("tbody");
    const wrap = el("table", {class: cls || ""}, el("thead", {}, el("tr", {}, ...headings.map((h) => el("th", {}, h)))), body);
    return [wrap, body];
  }

  const RENDER = {
    cards: {box: () => { const g = el("div", {class: "grid"}); return [g, g]; }, item: card},
    edits: {
      box: () => table(["input", "output", "instruction", "status", "scores"]),
      item: (it) => row([thumb(it.src.t, null, it.src.l), thumb(it.t, it.f, it.n),
        el("div", {}, el("b", {}, u(it.n)), el("div", {class: "prompt"}, u(it.p))), it.s, scores(it.sc)], it.id),
    },
    pairs: {
      box: () => table(["pair", "EN", "ZH", "EN text", "ZH text", "gap (EN − ZH)", "EN–ZH similarity"]),
      item: (it) => row([u(it.pair), side(it.en), side(it.zh), fmt(it.et), fmt(it.zt), fmt(it.gap), fmt(it.sim)]),
    },
    rejected: {
      box: () => { const d = el("div"); return [d, d]; },
      item: (it) => {
        const [attempts, body] = table(["#", "image", "strategy", "seed", "reason", "scores", "failed", "seconds", "passed"]);
        for (const a of it.att) {
          body.append(row([String(a.n), el("td", {class: "small"}, thumb(a.t, null, it.n + " #" + a.n)), a.st,
            String(a.seed), u(a.r), scores(a.sc), a.fm.join(", "), String(a.sec),
            el("span", {class: a.ok ? "pass" : "fail"}, a.ok ? "yes" : "no")]));
        }
        return el("div", {class: "rejected-job", "data-job": it.id},
          el("h3", {}, u(it.sec), " / ", u(it.n)),
          el("p", {class: "why"}, u(it.why)),
          el("div", {class: "series"}, el("div", {class: "best"}, thumb(it.t, it.f, it.n)),
            el("div", {}, el("div", {class: "prompt"}, u(it.p)), attempts)));
      },
    },
    failed: {
      box: () => table(["section", "job", "prompt", "error"]),
      item: (it) => row([u(it.sec), u(it.n), u(it.p), el("div", {class: "error"}, u(it.e))], it.id),
    },
  };
  function side(it) {
    if (!it) return "missing";
    return el("div", {"data-job": it.id}, thumb(it.t, it.f, it.n), el("div", {class: "prompt"}, u(it.p)));
  }

  function pager(box, list) {
    const render = RENDER[list.type];
    const [wrap, target] = render.box();
    const more = el("button", {class: "more", type: "button"});
    let shown = 0;
    function next() {
      const end = Math.min(shown + PAGE, list.items.length);
      for (; shown < end; shown++) target.append(render.item(list.items[shown]));
      more.textContent = "Show more (" + shown + " of " + list.items.length + " shown)";
      more.hidden = shown >= list.items.length;
    }
    more.addEventListener("click", next);
    if (list.items.length) box.append(wrap, more); else box.append(el("p", {class: "empty"}, "none"));
    next();
  }

  for (const box of document.querySelectorAll("[data-list]")) pager(box, data.lists[box.dataset.list]);
})();
