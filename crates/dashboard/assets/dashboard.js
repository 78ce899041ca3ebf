// Live updates for the dashboard: the server pushes whole sections (already rendered HTML) and
// log lines as server-sent events; without this script the page is the same, just static.
(function () {
  "use strict";
  var source = document.body.getAttribute("data-events");
  var live = document.getElementById("live");
  if (!source || !window.EventSource) return;
  var events = new EventSource(source);
  function mark(text, cls) {
    if (!live) return;
    live.textContent = text;
    live.className = "live " + cls;
  }
  events.onopen = function () { mark("live", "on"); };
  events.onerror = function () {
    // CLOSED: refused (e.g. 503 busy), no retry; otherwise the browser reconnects by itself.
    if (events.readyState === EventSource.CLOSED) mark("static: reload for updates", "off");
    else mark("reconnecting…", "off");
  };
  events.addEventListener("section", function (e) {
    var update = JSON.parse(e.data);
    var old = document.getElementById(update.id);
    if (!old) return;
    var holder = document.createElement("div");
    holder.innerHTML = update.html;
    if (holder.firstElementChild) old.replaceWith(holder.firstElementChild);
  });
  events.addEventListener("log", function (e) {
    var log = document.getElementById("log");
    if (!log) return;
    var atBottom = window.innerHeight + window.scrollY >= document.body.scrollHeight - 40;
    var lines = JSON.parse(e.data).lines;
    for (var i = 0; i < lines.length; i++) {
      var line = document.createElement("span");
      line.className = "line";
      var host = document.createElement("span");
      host.className = "host";
      host.textContent = lines[i].host;
      line.appendChild(host);
      line.appendChild(document.createTextNode(" " + lines[i].text));
      log.appendChild(line);
      log.appendChild(document.createTextNode("\n"));
    }
    // The page keeps a bounded number of lines, like the server.
    var max = parseInt(log.getAttribute("data-max-lines"), 10) || 5000;
    while (log.querySelectorAll(".line").length > max) {
      log.removeChild(log.firstChild);
      log.removeChild(log.firstChild);
    }
    if (atBottom) window.scrollTo(0, document.body.scrollHeight);
  });
})();
