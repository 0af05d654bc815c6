// Drawing edges: a small handle appears on the right of the node under the pointer; drag it
// onto another node to connect them (cytoscape-edgehandles does the gesture). "Connect mode"
// turns every node body into a handle, for touch screens and trackpads.

export function setupEdgeHandles(cy, overlay, { onConnect, newEdgeId }) {
  const eh = cy.edgehandles({
    canConnect(source, target) {
      // No self-loops, and one success edge per pair: a second one would be a duplicate.
      if (source.same(target)) return false;
      return source.edgesTo(target).filter((e) => (e.data('on') || 'success') === 'success').empty();
    },
    edgeParams() {
      return { data: { id: newEdgeId(), display: '' } };
    },
    hoverDelay: 80,
    snap: true,
    snapThreshold: 24,
    snapFrequency: 30,
    noEdgeEventsInDraw: true,
    disableBrowserGestures: true,
  });

  const handle = document.createElement('div');
  handle.className = 'edge-handle';
  handle.title = 'Drag onto another node to connect';
  handle.hidden = true;
  overlay.appendChild(handle);

  let hovered = null;
  let hideTimer = null;

  function place(node) {
    const box = node.renderedBoundingBox({ includeLabels: false, includeOverlays: false });
    handle.style.left = `${box.x2 - 7}px`;
    handle.style.top = `${(box.y1 + box.y2) / 2 - 7}px`;
    handle.hidden = false;
  }

  function hide() {
    handle.hidden = true;
    hovered = null;
  }

  // `mousemove` too: after drawing an edge the pointer rests on a node without a new mouseover.
  cy.on('mouseover mousemove', 'node', (event) => {
    if (event.target.hasClass('eh-ghost-node') || cy.scratch('drawing')) return;
    if (event.type === 'mousemove' && hovered === event.target && !handle.hidden) return;
    clearTimeout(hideTimer);
    hovered = event.target;
    place(hovered);
  });
  cy.on('mouseout', 'node', () => {
    clearTimeout(hideTimer);
    hideTimer = setTimeout(hide, 400);
  });
  cy.on('viewport position remove', () => {
    if (hovered && hovered.inside()) place(hovered);
    else hide();
  });
  handle.addEventListener('mouseenter', () => clearTimeout(hideTimer));
  handle.addEventListener('mousedown', (event) => {
    if (!hovered) return;
    event.preventDefault();
    event.stopPropagation();
    const source = hovered;
    hide();
    cy.scratch('drawing', true);
    eh.start(source);
    // The press began on the handle, outside Cytoscape's canvas, so Cytoscape never sees the
    // release as a tap end: finish the gesture ourselves (it makes the edge if a target is lit).
    window.addEventListener('mouseup', () => eh.stop(), { once: true });
  });
  cy.on('ehstop', () => cy.scratch('drawing', false));
  cy.on('ehcomplete', (event, source, target, edge) => onConnect(edge));

  return {
    setDrawMode(on) {
      if (on) eh.enableDrawMode();
      else eh.disableDrawMode();
    },
  };
}
