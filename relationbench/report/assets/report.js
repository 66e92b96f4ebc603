/* relbench report: renders one page of the gallery from the embedded JSON.
   The state (filters, sort, view, page) lives in the URL hash, e.g. #method=sdxl@tiny&kind=multi&sort=clip_r,
   read on load and on every hash change, and written when a control changes: a view can be shared.
   Text from the data is only ever set as textContent or an attribute, never parsed as HTML. */
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var SVG = "http://www.w3.org/2000/svg";
  var columns = {};
  data.columns.forEach(function (c) { columns[c.key] = c; });
  var labels = unique(data.runs.map(function (r) { return r.label; }));
  var DEFAULTS = {
    suite: "", kind: "", relation: "", method: "", sort: "", order: "desc",
    view: "cases", metric: columns.clip_r ? "clip_r" : (data.columns[0] ? data.columns[0].key : ""),
    a: "", b: "", page: "1"
  };
  var VIEWS = [["cases", "all cases"], ["worst", "worst cases (lowest metric of a method)"],
               ["gap", "largest gap between two methods"]];

  function unique(values) {
    var seen = {}, out = [];
    values.forEach(function (v) { if (!Object.prototype.hasOwnProperty.call(seen, v)) { seen[v] = 1; out.push(v); } });
    return out;
  }

  function el(tag, attrs, children) {
    var node = tag.indexOf("svg:") === 0 ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (attrs[k] !== null && attrs[k] !== undefined && attrs[k] !== false) node.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) {
      if (c !== null && c !== undefined) node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }

  // -- state ------------------------------------------------------------------------------
  function readState() {
    var params = new URLSearchParams(location.hash.replace(/^#/, ""));
    var state = Object.assign({}, DEFAULTS);
    Object.keys(DEFAULTS).forEach(function (k) { if (params.has(k)) state[k] = params.get(k); });
    return state;
  }

  function setState(changes) {
    var state = Object.assign(readState(), changes);
    if (!("page" in changes)) state.page = "1";  // a new selection starts at its first page
    var params = new URLSearchParams();
    Object.keys(DEFAULTS).forEach(function (k) { if (state[k] !== DEFAULTS[k]) params.set(k, state[k]); });
    var hash = params.toString();
    if (hash === location.hash.replace(/^#/, "")) render();
    else location.hash = hash;  // hashchange renders
  }

  // -- selection --------------------------------------------------------------------------
  function mean(c, label, key) {
    var m = c.means[label];
    return m && typeof m[key] === "number" ? m[key] : null;
  }

  function firstRun(s) { return s.method || labels[0] || ""; }

  function gapRuns(s) {
    var a = s.a || labels[0] || "";
    var b = s.b || labels.filter(function (l) { return l !== a; })[0] || a;
    return [a, b];
  }

  /* The cases the state selects, in order, each with the runs its card shows and the value it
     was ranked by (null: none). */
  function select(s) {
    var picked = data.cases.map(function (c, i) { return {c: c, i: i, value: null}; }).filter(function (x) {
      var c = x.c;
      return (!s.suite || c.suite === s.suite) && (!s.kind || c.kind === s.kind) &&
        (!s.relation || c.relation === s.relation) && (!s.method || c.samples[s.method]);
    });
    var key, sign;
    if (s.view === "worst") {
      key = s.metric;
      var run = firstRun(s);
      picked.forEach(function (x) { x.value = mean(x.c, run, key); });
      picked = picked.filter(function (x) { return x.value !== null; });
      sign = columns[key] && columns[key].direction === "lower" ? -1 : 1;  // worst first
      picked.sort(function (p, q) { return sign * (p.value - q.value) || p.i - q.i; });
    } else if (s.view === "gap") {
      var ab = gapRuns(s);
      picked.forEach(function (x) {
        var va = mean(x.c, ab[0], s.metric), vb = mean(x.c, ab[1], s.metric);
        x.value = va === null || vb === null ? null : va - vb;
      });
      picked = picked.filter(function (x) { return x.value !== null; });
      picked.sort(function (p, q) { return Math.abs(q.value) - Math.abs(p.value) || p.i - q.i; });
    } else if (s.sort && columns[s.sort]) {
      var by = firstRun(s);
      sign = s.order === "asc" ? 1 : -1;
      picked.forEach(function (x) { x.value = mean(x.c, by, s.sort); });
      picked.sort(function (p, q) {  // cases without a value last
        if (p.value === null || q.value === null) return (p.value === null) - (q.value === null) || p.i - q.i;
        return sign * (p.value - q.value) || p.i - q.i;
      });
    }
    return picked;
  }

  function shownRuns(c, s) {
    var runs = s.view === "gap" ? gapRuns(s) : s.method ? [s.method] : labels;
    return unique(runs).filter(function (l) { return c.samples[l]; });
  }

  // -- controls ---------------------------------------------------------------------------
  var form = document.getElementById("controls");

  function control(name, title, options) {
    var select = el("select", {name: name}, options.map(function (o) { return el("option", {value: o[0]}, [o[1]]); }));
    select.addEventListener("change", function () { var ch = {}; ch[name] = select.value; setState(ch); });
    var label = el("label", {"data-control": name}, [title, select]);
    form.appendChild(label);
    return label;
  }

  function all(values, what) {
    return [["", "all " + what]].concat(values.filter(Boolean).map(function (v) { return [v, v]; }));
  }

  var metricOptions = data.columns.map(function (c) { return [c.key, c.title]; });
  var controls = {
    suite: control("suite", "suite", all(unique(data.cases.map(function (c) { return c.suite; })).sort(), "suites")),
    kind: control("kind", "kind", all(unique(data.cases.map(function (c) { return c.kind; })).sort(), "kinds")),
    relation: control("relation", "relation",
                      all(unique(data.cases.map(function (c) { return c.relation; })).sort(), "relations")),
    method: control("method", "method (run)", all(labels, "methods")),
    view: control("view", "view", VIEWS),
    sort: control("sort", "sort by (case mean)", [["", "case order"]].concat(metricOptions)),
    order: control("order", "order", [["desc", "descending"], ["asc", "ascending"]]),
    metric: control("metric", "metric", metricOptions),
    a: control("a", "method A", labels.map(function (l) { return [l, l]; })),
    b: control("b", "method B", labels.map(function (l) { return [l, l]; }))
  };

  function syncControls(s) {
    var ab = gapRuns(s);
    var values = Object.assign({}, s, {a: ab[0], b: ab[1]});
    Object.keys(controls).forEach(function (k) { controls[k].querySelector("select").value = values[k]; });
    var hidden = {
      sort: s.view !== "cases", order: s.view !== "cases" || !s.sort, metric: s.view === "cases",
      a: s.view !== "gap", b: s.view !== "gap"
    };
    Object.keys(hidden).forEach(function (k) { controls[k].hidden = hidden[k]; });
  }

  // -- cards ------------------------------------------------------------------------------
  function fmt(value, key) {
    var c = columns[key];
    return value === null || value === undefined ? "–" : value.toFixed(c ? c.digits : 3);
  }

  function titleOf(key) { return columns[key] ? columns[key].title : key; }

  function layoutSvg(c) {
    var svg = el("svg:svg", {"class": "layout", viewBox: "0 0 100 100", role: "img",
                             "aria-label": "layout of " + c.id});
    c.boxes.forEach(function (b, j) {
      var color = data.layoutColors[j % data.layoutColors.length];
      var subject = data.subjects[c.subjects[j]];
      svg.appendChild(el("svg:rect", {x: b[0] * 100, y: b[1] * 100, width: (b[2] - b[0]) * 100,
                                      height: (b[3] - b[1]) * 100, fill: "none", stroke: color, "stroke-width": 1.5}));
      var y = j === 0 ? b[1] * 100 + 8 : b[3] * 100 - 3;  // first label at its box's top, second at its bottom
      svg.appendChild(el("svg:text", {x: b[0] * 100 + 2, y: y, fill: color}, [subject ? subject.name : ""]));
    });
    return svg;
  }

  function picture(item, alt) {
    if (!item.thumb) return el("a", {href: item.href}, [el("div", {"class": "broken"}, ["unreadable"])]);
    return el("a", {href: item.href, target: "_blank", rel: "noopener"},
              [el("img", {src: item.thumb, alt: alt, loading: "lazy", decoding: "async"})]);
  }

  function scoreList(scores) {
    return el("ul", {"class": "scores"}, data.columns.filter(function (col) {
      return typeof scores[col.key] === "number";
    }).map(function (col) {
      return el("li", {title: col.title}, [el("span", {}, [col.title]), " " + fmt(scores[col.key], col.key)]);
    }));
  }

  function card(x, s) {
    var c = x.c;
    var head = [el("h3", {}, [c.suite + " / " + c.id]), el("span", {"class": "badge"}, [c.kind])];
    if (c.relation) head.push(el("span", {"class": "badge"}, [c.relation]));
    if (x.value !== null) {
      var key = s.view === "cases" ? s.sort : s.metric;
      var what = s.view === "gap" ? gapRuns(s).join(" − ") : firstRun(s);
      head.push(el("span", {"class": "badge value"},
                   [titleOf(key) + " " + (s.view === "gap" && x.value > 0 ? "+" : "") + fmt(x.value, key) + " · " + what]));
    }
    if (c.sheet) head.push(el("a", {"class": "sheet-link", href: c.sheet, target: "_blank"}, ["contact sheet"]));
    var inputs = [layoutSvg(c)].concat(c.subjects.map(function (id) {
      var subject = data.subjects[id];
      return el("div", {"class": "subject"}, [
        el("span", {"class": "name"}, [subject.name + " (" + subject["class"] + ")"]),
        el("div", {"class": "refs"}, subject.refs.length ? subject.refs.map(function (r) {
          return picture(r, "reference of " + subject.name);
        }) : [el("span", {"class": "empty"}, ["no reference images"])])
      ]);
    }));
    var runs = shownRuns(c, s).map(function (label) {
      var means = Object.keys(c.means[label] || {}).filter(function (k) { return columns[k]; }).map(function (k) {
        return titleOf(k) + " " + fmt(c.means[label][k], k);
      });
      return el("div", {"class": "run", "data-run": label}, [
        el("div", {"class": "run-head"}, [el("strong", {}, [label]),
          el("span", {"class": "mean"}, [means.length ? "case mean: " + means.join(" · ") : "not scored"])]),
        el("div", {"class": "samples"}, c.samples[label].map(function (sample) {
          return el("figure", {"class": "sample"}, [
            picture(sample, label + " sample " + sample.index),
            el("figcaption", {}, ["#" + sample.index, scoreList(sample.scores)])
          ]);
        }))
      ]);
    });
    return el("article", {"class": "case", "data-case": c.suite + "/" + c.id},
              [el("header", {}, head), el("p", {"class": "prompt"}, [c.prompt]),
               el("div", {"class": "inputs"}, inputs)].concat(runs));
  }

  // -- pages ------------------------------------------------------------------------------
  function pager(nav, page, pages) {
    nav.textContent = "";
    if (pages <= 1) return;
    function button(text, target, current) {
      var b = el("button", {type: "button", "aria-current": current ? "page" : null,
                            disabled: target < 1 || target > pages ? "disabled" : null}, [text]);
      b.addEventListener("click", function () { setState({page: String(target)}); });
      nav.appendChild(b);
    }
    button("‹ prev", page - 1, false);
    var last = 0;
    for (var p = 1; p <= pages; p++) {
      if (p === 1 || p === pages || Math.abs(p - page) <= 2) {
        if (p - last > 1) nav.appendChild(el("span", {"class": "gap"}, ["…"]));
        button(String(p), p, p === page);
        last = p;
      }
    }
    button("next ›", page + 1, false);
  }

  function render() {
    var s = readState();
    syncControls(s);
    var picked = select(s);
    var size = data.pageSize;
    var pages = Math.max(1, Math.ceil(picked.length / size));
    var page = Math.min(Math.max(parseInt(s.page, 10) || 1, 1), pages);
    var shown = picked.slice((page - 1) * size, page * size);
    document.getElementById("count").textContent = picked.length
      ? "showing " + ((page - 1) * size + 1) + "–" + ((page - 1) * size + shown.length) + " of " + picked.length +
        " cases" + (picked.length < data.cases.length ? " (" + data.cases.length + " in all)" : "")
      : "no cases match (" + data.cases.length + " in all)";
    var list = document.getElementById("cases");
    list.textContent = "";
    shown.forEach(function (x) { list.appendChild(card(x, s)); });
    document.querySelectorAll("nav.pager").forEach(function (nav) { pager(nav, page, pages); });
  }

  document.querySelectorAll("[data-scroll]").forEach(function (b) {
    b.addEventListener("click", function () { document.getElementById(b.dataset.scroll).scrollIntoView(); });
  });
  document.querySelectorAll("a.method-link").forEach(function (a) {  // an ablation's variant: its run's cases
    a.addEventListener("click", function () {
      setTimeout(function () { document.getElementById("gallery").scrollIntoView(); }, 0);
    });
  });
  window.addEventListener("hashchange", render);
  render();
})();
