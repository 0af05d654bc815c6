// The palette: drag a kind onto the canvas (HTML drag and drop), or press it (click, Enter)
// to add the node in the middle of the view.

const MIME = 'application/x-baton-kind';

export function setupPalette(palette, container, { cy, onAdd }) {
  palette.querySelectorAll('[data-kind]').forEach((item) => {
    item.addEventListener('dragstart', (event) => {
      event.dataTransfer.setData(MIME, item.dataset.kind);
      event.dataTransfer.setData('text/plain', item.dataset.kind);
      event.dataTransfer.effectAllowed = 'copy';
    });
    item.addEventListener('click', () => {
      const pan = cy.pan();
      const zoom = cy.zoom();
      // Nudge each new node so that repeated clicks do not stack them exactly.
      const jitter = (cy.nodes().length % 5) * 24;
      onAdd(item.dataset.kind, {
        x: (container.clientWidth / 2 - pan.x) / zoom + jitter,
        y: (container.clientHeight / 2 - pan.y) / zoom + jitter,
      });
    });
  });

  container.addEventListener('dragover', (event) => {
    if (!event.dataTransfer.types.includes(MIME)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = 'copy';
  });
  container.addEventListener('drop', (event) => {
    const kind = event.dataTransfer.getData(MIME);
    if (!kind) return;
    event.preventDefault();
    const rect = container.getBoundingClientRect();
    const pan = cy.pan();
    const zoom = cy.zoom();
    onAdd(kind, {
      x: (event.clientX - rect.left - pan.x) / zoom,
      y: (event.clientY - rect.top - pan.y) / zoom,
    });
  });
}
