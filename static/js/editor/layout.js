// Auto-layout (dagre: layered, left to right, few crossings), fit-to-screen and zoom.

const MAX_FIT_ZOOM = 1.2;

export function autoLayout(cy, { animate = true } = {}) {
  return new Promise((resolve) => {
    if (cy.nodes().empty()) {
      resolve();
      return;
    }
    const layout = cy.layout({
      name: 'dagre',
      rankDir: 'LR',
      nodeSep: 40,
      rankSep: 90,
      edgeSep: 20,
      // Beyond a few hundred elements an animation costs more than it shows.
      animate: animate && cy.elements().length < 400,
      animationDuration: 250,
      fit: false,
    });
    layout.one('layoutstop', () => {
      fit(cy);
      resolve();
    });
    layout.run();
  });
}

export function fit(cy) {
  if (cy.elements().empty()) {
    cy.reset();
    return;
  }
  cy.fit(undefined, 40);
  // A graph of two nodes should not fill the screen with giant boxes.
  if (cy.zoom() > MAX_FIT_ZOOM) {
    cy.zoom(MAX_FIT_ZOOM);
    cy.center();
  }
}

export function zoomBy(cy, factor) {
  const container = cy.container();
  cy.zoom({
    level: cy.zoom() * factor,
    renderedPosition: { x: container.clientWidth / 2, y: container.clientHeight / 2 },
  });
}
