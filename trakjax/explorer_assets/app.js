// trakjax's explorer: every target with its top-k proponents and opponents.
// Reads the JSON inlined in index.html (#trakjax-data), renders targets lazily in batches,
// and loads thumbnail pixels from sibling .js files (<script src>, so it works from file://).
// Text goes into the page with textContent only. Markup contract: each target entry has
// data-target="<index>", each example in it data-example="<train index>" in rank order,
// proponents first; <body data-ready="1"> once the first screen is rendered.
(function () {
  "use strict";

  var BATCH = 20;
  var THUMBNAIL_PIXELS = 64;
  var data = JSON.parse(document.getElementById("trakjax-data").textContent);
  var targets = data.targets;
  var byIndex = new Map();
  var appearances = null;
  var container = document.getElementById("targets");
  var statusLine = document.getElementById("status");
  var state = { order: "index", label: "", train: null, focus: null };
  var view = [];
  var shownFrom = 0;
  var shownTo = 0;
  var observer = null;
  var chunkPromises = {};
  var chunkResolvers = {};

  function element(tag, className, text) {
    var node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined && text !== null) { node.textContent = text; }
    return node;
  }

  function labelText(value) {
    if (value === null || value === undefined) { return ""; }
    if (typeof value === "object") { return JSON.stringify(value); }
    return String(value);
  }

  function asNumber(value) {
    return typeof value === "number" ? value : Number(value);
  }

  function scoreText(value) {
    if (typeof value !== "number") { return String(value); }
    return (value >= 0 ? "+" : "") + value.toPrecision(4);
  }

  targets.forEach(function (target) {
    byIndex.set(target.t, target);
    target.label = labelText(target.y);
    target.top = target.ps.length ? asNumber(target.ps[0]) : -Infinity;
    target.total = target.ps.concat(target.os).reduce(function (sum, s) {
      return sum + Math.abs(asNumber(s));
    }, 0);
  });

  function appearanceMap() {
    if (appearances === null) {
      appearances = new Map();
      targets.forEach(function (target) {
        target.p.concat(target.o).forEach(function (i) {
          if (!appearances.has(i)) { appearances.set(i, []); }
          var list = appearances.get(i);
          if (list[list.length - 1] !== target.t) { list.push(target.t); }
        });
      });
    }
    return appearances;
  }

  // ---------------------------------------------------------------- thumbnails

  window.trakjaxPixels = function (name, encoded) {
    var raw = atob(encoded);
    var bytes = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) { bytes[i] = raw.charCodeAt(i); }
    if (chunkResolvers[name]) { chunkResolvers[name](bytes); }
  };

  function loadChunk(number) {
    var name = data.images.chunks[number];
    if (!chunkPromises[name]) {
      chunkPromises[name] = new Promise(function (resolve, reject) {
        chunkResolvers[name] = resolve;
        var script = document.createElement("script");
        script.src = data.asset_dir + "/" + name;
        script.onerror = function () { reject(new Error("could not load " + script.src)); };
        document.head.appendChild(script);
      });
    }
    return chunkPromises[name];
  }

  function thumbnail(slot, side) {
    var images = data.images;
    var canvas = element("canvas", "thumbnail");
    canvas.width = images.width;
    canvas.height = images.height;
    var scale = side / Math.max(images.width, images.height);
    canvas.style.width = Math.round(images.width * scale) + "px";
    canvas.style.height = Math.round(images.height * scale) + "px";
    var chunk = Math.floor(slot / images.per_chunk);
    var promise = loadChunk(chunk).then(function (bytes) {
      draw(canvas, bytes, (slot % images.per_chunk) * images.width * images.height * images.channels);
    });
    return { node: canvas, promise: promise };
  }

  function draw(canvas, bytes, offset) {
    var images = data.images;
    var picture = canvas.getContext("2d").createImageData(images.width, images.height);
    var pixels = images.width * images.height;
    var c = images.channels;
    for (var p = 0; p < pixels; p++) {
      var at = offset + p * c;
      var out = p * 4;
      if (c === 1) {
        var v = 255 - bytes[at]; // single channel: dark is high, as in attributions.png
        picture.data[out] = v; picture.data[out + 1] = v; picture.data[out + 2] = v;
        picture.data[out + 3] = 255;
      } else {
        picture.data[out] = bytes[at]; picture.data[out + 1] = bytes[at + 1];
        picture.data[out + 2] = bytes[at + 2]; picture.data[out + 3] = c === 4 ? bytes[at + 3] : 255;
      }
    }
    canvas.getContext("2d").putImageData(picture, 0, 0);
  }

  // ---------------------------------------------------------------- one example

  function contentNode(split, index, slot, pending) {
    if (data.kind === "image") {
      if (slot === undefined || slot < 0) { return element("span", "no-thumbnail", "(no thumbnail: size budget)"); }
      var made = thumbnail(slot, split === "target" ? 2 * THUMBNAIL_PIXELS : THUMBNAIL_PIXELS);
      pending.push(made.promise);
      return made.node;
    }
    var content = data.content[split][String(index)];
    if (!content) { return null; }
    if (content.text !== undefined) {
      return element("pre", "text", content.text + (content.cut ? " …(cut)" : ""));
    }
    if (content.ids !== undefined) {
      var more = content.length > content.ids.length ? " … (" + content.length + " ids)" : "";
      return element("pre", "ids", "ids " + content.ids.join(" ") + more);
    }
    var rest = content.size > content.values.length ? " … (" + content.size + " values)" : "";
    return element("pre", "values", content.values.map(String).join(", ") + rest);
  }

  function exampleItem(kind, rank, index, score, pending) {
    var item = element("li", "example " + kind);
    item.setAttribute("data-example", String(index));
    var head = element("div", "example-head");
    head.appendChild(element("span", "rank", "#" + rank));
    head.appendChild(element("span", "index", "train " + index));
    var label = labelText(data.train_labels[String(index)]);
    if (label) { head.appendChild(element("span", "label", "label " + label)); }
    head.appendChild(element("span", "score", scoreText(score)));
    item.appendChild(head);
    var slot = data.images ? trainSlots.get(index) : undefined;
    var content = contentNode("train", index, slot, pending);
    if (content) { item.appendChild(content); }
    var count = appearanceMap().get(index).length;
    var link = element("a", "appears", "in " + count + " target" + (count === 1 ? "" : "s"));
    link.href = "#train=" + index;
    link.title = "show every target this training example is a proponent or opponent of";
    item.appendChild(link);
    return item;
  }

  var trainSlots = new Map();
  var targetSlots = new Map();
  if (data.images) {
    targets.forEach(function (target, position) { targetSlots.set(target.t, data.images.slots[0][position]); });
    data.images.train.forEach(function (i, n) { trainSlots.set(i, data.images.slots[1][n]); });
  }

  // ---------------------------------------------------------------- one target

  function targetEntry(target, pending) {
    var entry = element("section", "target");
    entry.setAttribute("data-target", String(target.t));
    entry.id = "target-" + target.t;
    var head = element("div", "target-head");
    var link = element("a", "target-name", "target " + target.t);
    link.href = "#target=" + target.t;
    head.appendChild(link);
    if (target.label) { head.appendChild(element("span", "label", "label " + target.label)); }
    if (target.pred !== undefined) { head.appendChild(element("span", "prediction", "predicted " + labelText(target.pred))); }
    head.appendChild(element("span", "stat", "top proponent " + scoreText(target.ps[0])));
    head.appendChild(element("span", "stat", "Σ|scores| " + target.total.toPrecision(4)));
    entry.appendChild(head);
    var body = element("div", "target-body");
    var own = element("div", "target-input");
    var content = contentNode("target", target.t, targetSlots.get(target.t), pending);
    if (content) { own.appendChild(content); } else { own.appendChild(element("span", "no-input", "input not shown")); }
    body.appendChild(own);
    [["proponents", target.p, target.ps], ["opponents", target.o, target.os]].forEach(function (group) {
      var box = element("div", "group " + group[0]);
      box.appendChild(element("h3", null, group[0]));
      var list = element("ol", "examples");
      group[1].forEach(function (index, r) {
        list.appendChild(exampleItem(group[0].slice(0, -1), r + 1, index, group[2][r], pending));
      });
      box.appendChild(list);
      body.appendChild(box);
    });
    entry.appendChild(body);
    return entry;
  }

  // ---------------------------------------------------------------- the list

  function currentView() {
    var list = targets;
    if (state.train !== null) {
      var wanted = new Set(appearanceMap().get(state.train) || []);
      list = list.filter(function (t) { return wanted.has(t.t); });
    }
    if (state.label !== "") {
      list = list.filter(function (t) { return t.label === state.label; });
    }
    list = list.slice();
    var orders = {
      index: function (a, b) { return a.t - b.t; },
      label: function (a, b) { return a.label < b.label ? -1 : a.label > b.label ? 1 : a.t - b.t; },
      top: function (a, b) { return b.top - a.top || a.t - b.t; },
      total: function (a, b) { return b.total - a.total || a.t - b.t; }
    };
    list.sort(orders[state.order]);
    return list;
  }

  function appendBatch() {
    var pending = [];
    var stop = Math.min(view.length, shownTo + BATCH);
    var sentinel = document.getElementById("more");
    for (var n = shownTo; n < stop; n++) {
      container.insertBefore(targetEntry(view[n], pending), sentinel);
    }
    shownTo = stop;
    updateStatus();
    if (shownTo >= view.length && sentinel) { sentinel.hidden = true; }
    return Promise.all(pending);
  }

  function prependBatch() {
    var pending = [];
    var start = Math.max(0, shownFrom - BATCH);
    var first = container.querySelector("section.target");
    for (var n = start; n < shownFrom; n++) {
      container.insertBefore(targetEntry(view[n], pending), first);
    }
    shownFrom = start;
    var earlier = document.getElementById("earlier");
    if (shownFrom === 0 && earlier) { earlier.remove(); } else if (earlier) { earlier.textContent = earlierText(); }
    updateStatus();
    return Promise.all(pending);
  }

  function earlierText() { return "show " + Math.min(BATCH, shownFrom) + " earlier targets"; }

  function updateStatus() {
    var text = view.length + " of " + targets.length + " targets";
    if (state.train !== null) { text += " with training example " + state.train + " among their proponents or opponents"; }
    if (state.label !== "") { text += " labelled " + state.label; }
    text += "; showing " + (view.length ? shownFrom + 1 : 0) + "–" + shownTo + " (more load as you scroll)";
    statusLine.textContent = text;
  }

  function render() {
    document.body.setAttribute("data-ready", "0");
    if (observer) { observer.disconnect(); }
    container.textContent = "";
    view = currentView();
    shownFrom = 0;
    if (state.focus !== null) {
      var at = view.findIndex(function (t) { return t.t === state.focus; });
      if (at < 0) {
        state.label = "";
        state.train = null;
        document.getElementById("label-filter").value = "";
        view = currentView();
        at = view.findIndex(function (t) { return t.t === state.focus; });
      }
      if (at < 0) { container.appendChild(element("p", "missing", "there is no target " + state.focus)); }
      shownFrom = Math.max(0, at);
    }
    shownTo = shownFrom;
    if (shownFrom > 0) {
      var earlier = element("button", "earlier", earlierText());
      earlier.id = "earlier";
      earlier.type = "button";
      earlier.addEventListener("click", guarded(function () { prependBatch().catch(reportError); }));
      container.appendChild(earlier);
    }
    var sentinel = element("div", "more", "");
    sentinel.id = "more";
    container.appendChild(sentinel);
    var done = appendBatch();
    if (window.IntersectionObserver) {
      observer = new IntersectionObserver(guarded(function (entries) {
        if (entries.some(function (e) { return e.isIntersecting; }) && shownTo < view.length) {
          appendBatch().catch(reportError);
          // observe afresh: a sentinel still in view after the batch would not be reported again
          observer.unobserve(sentinel);
          observer.observe(sentinel);
        }
      }), { rootMargin: "600px" });
      observer.observe(sentinel);
    }
    // A focused target J is the first entry rendered (earlier ones behind a button), so it is on
    // the first screen without scrolling.
    done.catch(reportError).then(function () { document.body.setAttribute("data-ready", "1"); });
  }

  // The view is the URL's hash: #target=J (J first), #train=I (the targets I is listed for),
  // sort=index|label|top|total, label=Y; e.g. #sort=total&label=3.
  var ORDERS = ["index", "label", "top", "total"];

  function fromHash() {
    var params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    var number = function (name) {
      var value = params.get(name);
      return value !== null && /^-?\d+$/.test(value) ? Number(value) : null;
    };
    state.focus = number("target");
    state.train = number("train");
    state.order = ORDERS.indexOf(params.get("sort")) >= 0 ? params.get("sort") : "index";
    state.label = params.get("label") || "";
    document.getElementById("sort").value = state.order;
    document.getElementById("label-filter").value = state.label;
    document.getElementById("clear").hidden = window.location.hash.length <= 1;
    render();
  }

  function setHash(changes) {
    var params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    params.delete("target");
    Object.keys(changes).forEach(function (name) {
      if (changes[name] === null || changes[name] === "") { params.delete(name); }
      else { params.set(name, String(changes[name])); }
    });
    var hash = params.toString();
    if (hash === window.location.hash.replace(/^#/, "")) { fromHash(); } else { window.location.hash = hash; }
  }

  // ---------------------------------------------------------------- header and controls

  function renderSummary() {
    var header = document.getElementById("summary");
    header.appendChild(element("h1", null, data.title));
    var shown = { image: "thumbnails", tokens: data.decoded ? "decoded text" : "token ids",
                  table: "first values", none: "indices and scores only (inputs cannot be drawn)" }[data.kind];
    header.appendChild(element("p", "counts", targets.length + " targets, top " + data.k +
      " proponents and opponents each; inputs shown as " + shown +
      (data.images && data.images.step > 1 ? " (every " + data.images.step + "th pixel)" : "")));
    if (data.headline && data.headline.length) {
      header.appendChild(element("p", "headline", data.headline.join(" · ")));
    }
    if (data.summary.length) {
      var list = element("dl", "summary");
      data.summary.forEach(function (row) {
        var pair = element("div");
        pair.appendChild(element("dt", null, row[0]));
        pair.appendChild(element("dd", null, row[1]));
        list.appendChild(pair);
      });
      var details = element("details");
      details.open = data.summary.length <= 12;
      details.appendChild(element("summary", null, "run summary: settings, results, seconds per stage"));
      details.appendChild(list);
      header.appendChild(details);
    }
  }

  function option(select, value, text) {
    var node = element("option", null, text);
    node.value = value;
    select.appendChild(node);
  }

  function renderControls() {
    var nav = document.getElementById("controls");
    var find = element("input");
    find.type = "search";
    find.id = "find";
    find.placeholder = "target index, or label:y";
    var findLabel = element("label", null, "find ");
    findLabel.appendChild(find);
    nav.appendChild(findLabel);
    find.addEventListener("change", guarded(function () {
      var text = find.value.trim();
      var label = /^label\s*[:=]?\s*(.*)$/.exec(text);
      if (/^\d+$/.test(text)) {
        if (byIndex.has(Number(text))) { setHash({ train: null, label: null, target: Number(text) }); }
        else { statusLine.textContent = "there is no target " + text; }
      } else if (text !== "") {
        setHash({ label: label ? label[1] : text });
      }
    }));

    var sort = element("select");
    sort.id = "sort";
    option(sort, "index", "target index");
    option(sort, "label", "label");
    option(sort, "top", "top proponent's score");
    option(sort, "total", "Σ|scores| (listed examples)");
    sort.addEventListener("change", guarded(function () { setHash({ sort: sort.value === "index" ? null : sort.value }); }));
    var sortLabel = element("label", null, "sort by ");
    sortLabel.appendChild(sort);
    nav.appendChild(sortLabel);

    var labels = element("select");
    labels.id = "label-filter";
    option(labels, "", "all labels");
    var distinct = Array.from(new Set(targets.map(function (t) { return t.label; }))).filter(Boolean).sort();
    distinct.slice(0, 1000).forEach(function (l) { option(labels, l, l); });
    labels.addEventListener("change", guarded(function () { setHash({ label: labels.value }); }));
    var labelsLabel = element("label", null, "label ");
    labelsLabel.appendChild(labels);
    nav.appendChild(labelsLabel);

    var clear = element("button", null, "show all targets");
    clear.id = "clear";
    clear.type = "button";
    clear.addEventListener("click", guarded(function () {
      find.value = "";
      if (window.location.hash.length > 1) { window.location.hash = ""; } else { fromHash(); }
    }));
    nav.appendChild(clear);
  }

  // Errors of a file:// script reach window.onerror only as "Script error.": report them here,
  // with their message and stack, into #trakjax-errors.
  function reportError(error) {
    window.trakjaxReportError("error: " + (error && error.stack ? error.stack : String(error)));
  }

  function guarded(handler) {
    return function (event) {
      try { handler(event); } catch (error) { reportError(error); }
    };
  }

  try {
    data.asset_dir = data.asset_dir || "explorer";
    document.body.classList.add("kind-" + data.kind);
    renderSummary();
    renderControls();
    window.addEventListener("hashchange", guarded(fromHash));
    fromHash();
  } catch (error) {
    reportError(error);
  }
})();
