// Keyboard shortcuts of the approvals inbox: j/k move, a approves, r focuses the reason field
// (Enter then rejects). Cards come and go over the socket, so everything is looked up live.
(function () {
  "use strict";

  var current = null;
  var currentIndex = -1;

  function cards() {
    return Array.prototype.slice.call(document.querySelectorAll("#approval-items .approval"));
  }

  function select(card) {
    if (current) current.classList.remove("is-current");
    current = card || null;
    currentIndex = current ? cards().indexOf(current) : -1;
    if (!current) return;
    current.classList.add("is-current");
    current.focus({ preventScroll: true });
    current.scrollIntoView({ block: "nearest" });
  }

  function move(step) {
    var list = cards();
    if (!list.length) return;
    var index = list.indexOf(current);
    index = index < 0 ? 0 : Math.min(list.length - 1, Math.max(0, index + step));
    select(list[index]);
  }

  function typing(target) {
    return target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (typing(event.target)) {
      if (event.key === "Escape") event.target.blur();
      return;
    }
    if (!document.getElementById("approval-items")) return;
    var button;
    switch (event.key) {
      case "j": move(1); break;
      case "k": move(-1); break;
      case "a":
        if (!current) return;
        button = current.querySelector("[data-action=approve]");
        if (button) button.click();
        break;
      case "r":
        if (!current) return;
        button = current.querySelector("[data-reason]");
        if (button) button.focus();
        break;
      default:
        return;
    }
    event.preventDefault();
  });

  // Clicking into a card makes it the current one.
  document.addEventListener("focusin", function (event) {
    var card = event.target.closest && event.target.closest("#approval-items .approval");
    if (card && card !== current) {
      if (current) current.classList.remove("is-current");
      current = card;
      currentIndex = cards().indexOf(card);
      card.classList.add("is-current");
    }
  });

  document.addEventListener("change", function (event) {
    if (event.target.id !== "approvals-select-all") return;
    cards().forEach(function (card) {
      var box = card.querySelector(".approval-check");
      if (box) box.checked = event.target.checked;
    });
  });

  // After any swap: drop a card the socket delivered twice, and when the current card was
  // decided (here or elsewhere) move on to the one that took its place.
  function tidy() {
    var seen = {};
    cards().forEach(function (card) {
      if (seen[card.id]) card.remove();
      seen[card.id] = true;
    });
    if (current && !document.body.contains(current)) {
      var list = cards();
      current = null;
      if (list.length) select(list[Math.min(currentIndex, list.length - 1)]);
    }
  }

  document.addEventListener("htmx:afterSettle", tidy);
  document.addEventListener("htmx:wsAfterMessage", tidy);
  document.addEventListener("htmx:oobAfterSwap", tidy);
})();
