// Render the math that pymdownx.arithmatex (generic mode) leaves in the page, with the vendored
// KaTeX: inline \( ... \) in span.arithmatex, display \[ ... \] in div.arithmatex.
(function () {
  function render(root) {
    var nodes = (root || document).querySelectorAll(".arithmatex");
    for (var i = 0; i < nodes.length; i++) {
      renderMathInElement(nodes[i], {
        delimiters: [
          { left: "\\[", right: "\\]", display: true },
          { left: "\\(", right: "\\)", display: false },
        ],
        throwOnError: false,
      });
    }
  }
  // Material re-renders pages without a reload when instant navigation is on: follow it.
  if (typeof document$ !== "undefined") {
    document$.subscribe(function () { render(document); });
  } else if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", function () { render(document); });
  } else {
    render(document);
  }
})();
