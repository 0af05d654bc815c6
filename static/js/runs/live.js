// Live run pages. htmx's ws extension applies the fragments; this file only
// 1. tells the server, on every (re)connect, the last event the page applied (#run-seq), so it
//    replays exactly what the page missed;
// 2. polls /runs/<id>/events/ while no socket is open (the #run-poller element);
// 3. keeps appended fragments unique and #run-seq from moving backwards;
// 4. ticks the elapsed time of a running run between updates.
(function () {
  "use strict";

  var live = (window.BatonLive = {
    polling: false,
    lastSeq: function () {
      var marker = document.getElementById("run-seq");
      return marker ? parseInt(marker.getAttribute("data-seq"), 10) || 0 : 0;
    },
  });

  document.addEventListener("htmx:wsOpen", function (evt) {
    var root = evt.target;
    if (root.dataset.live === "run") {
      live.socket = evt.detail.event.target;
      live.polling = false;
      evt.detail.socketWrapper.send(JSON.stringify({ last_seq: live.lastSeq() }));
    } else if (root.dataset.live === "list" && root.dataset.wasOpen) {
      htmx.trigger(root, "runs:resync"); // rows changed while the socket was down
    }
    root.dataset.wasOpen = "1";
  });

  function socketLost(evt) {
    var closed = evt.detail && evt.detail.event && evt.detail.event.target;
    // A replaced socket closing late must not switch polling on under the new one.
    if (evt.target.dataset && evt.target.dataset.live === "run" && (!live.socket || closed === live.socket)) {
      live.polling = true;
    }
  }
  document.addEventListener("htmx:wsClose", socketLost);
  document.addEventListener("htmx:wsError", socketLost);

  document.addEventListener("DOMContentLoaded", function () {
    var root = document.querySelector('[data-live="run"]');
    if (root) {
      setTimeout(function () {
        if (!root.dataset.wasOpen) live.polling = true;
      }, 3000);
    }
  });

  document.addEventListener("htmx:oobBeforeSwap", function (evt) {
    var target = evt.detail.target;
    var fragment = evt.detail.fragment;
    if (target.id === "run-seq") {
      var marker = fragment.firstElementChild || fragment;
      var seq = parseInt(marker.getAttribute && marker.getAttribute("data-seq"), 10) || 0;
      if (seq <= live.lastSeq()) evt.detail.shouldSwap = false;
      return;
    }
    // A step or an event line the page already has (rendered with the page, or replayed).
    Array.prototype.slice.call(fragment.children || []).forEach(function (child) {
      if (child.id && child.id !== target.id && document.getElementById(child.id)) child.remove();
    });
  });

  function duration(seconds) {
    if (seconds < 60) return seconds.toFixed(1) + "s";
    var minutes = Math.floor(seconds / 60);
    var secs = Math.floor(seconds % 60);
    if (minutes < 60) return minutes + "m " + (secs < 10 ? "0" : "") + secs + "s";
    var mins = minutes % 60;
    return Math.floor(minutes / 60) + "h " + (mins < 10 ? "0" : "") + mins + "m";
  }

  var firstSeen = new WeakMap();
  setInterval(function () {
    document.querySelectorAll("[data-ticking][data-elapsed]").forEach(function (el) {
      if (!firstSeen.has(el)) firstSeen.set(el, Date.now());
      var base = parseFloat(el.getAttribute("data-elapsed")) || 0;
      el.textContent = duration(base + (Date.now() - firstSeen.get(el)) / 1000);
    });
  }, 1000);
})();
