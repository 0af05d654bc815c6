// The canvas stylesheet. Colours of run statuses come from the site's CSS variables
// (static/css/baton.css), so the canvas lights up exactly like the dashboard, in both themes.

const KIND_LOOK = {
  agent: { shape: 'round-rectangle', fill: '#e0e7ff', line: '#4f46e5' },
  tool: { shape: 'cut-rectangle', fill: '#fef3c7', line: '#b45309' },
  router: { shape: 'round-diamond', fill: '#ede9fe', line: '#7c3aed' },
  parallel: { shape: 'round-rectangle', fill: '#dcfce7', line: '#15803d' },
  join: { shape: 'round-rectangle', fill: '#dcfce7', line: '#15803d' },
  supervisor: { shape: 'round-hexagon', fill: '#fce7f3', line: '#be185d' },
  vote: { shape: 'round-octagon', fill: '#e0f2fe', line: '#0369a1' },
  debate: { shape: 'round-octagon', fill: '#ffedd5', line: '#c2410c' },
  subworkflow: { shape: 'barrel', fill: '#f1f5f9', line: '#475569' },
  approval: { shape: 'round-tag', fill: '#fef9c3', line: '#a16207' },
};

// Step statuses -> [fill variable, line variable] in baton.css.
const STATUS_VARS = {
  pending: ['--warn-soft', '--warn'],
  waiting: ['--warn-soft', '--warn'],
  running: ['--info-soft', '--info'],
  succeeded: ['--ok-soft', '--ok'],
  failed: ['--bad-soft', '--bad'],
  skipped: ['--neutral-soft', '--muted'],
  cancelled: ['--neutral-soft', '--muted'],
};

export const STATUSES = Object.keys(STATUS_VARS);

function cssVar(name, fallback) {
  const value = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  return value || fallback;
}

// A red round badge with the number of problems, drawn over a node's top-right corner.
export function problemBadge(count) {
  const text = count > 9 ? '9+' : String(count);
  const svg = `<svg xmlns="http://www.w3.org/2000/svg" width="22" height="22">` +
    `<circle cx="11" cy="11" r="10" fill="${cssVar('--bad', '#c62828')}"/>` +
    `<text x="11" y="15" font-size="12" font-family="sans-serif" font-weight="700" ` +
    `text-anchor="middle" fill="#ffffff">${text}</text></svg>`;
  return `data:image/svg+xml;utf8,${encodeURIComponent(svg)}`;
}

export function stylesheet() {
  // Kind fills are light in both themes, so node text stays dark; edge labels and run-status
  // fills follow the theme.
  const text = '#1c2330';
  const themeText = cssVar('--text', text);
  const accent = cssVar('--accent', '#4f46e5');
  const muted = cssVar('--muted', '#5d6675');
  const bad = cssVar('--bad', '#c62828');
  const warn = cssVar('--warn', '#b45309');
  const surface = cssVar('--surface', '#ffffff');
  const style = [
    {
      selector: 'node',
      style: {
        label: 'data(display)',
        'text-wrap': 'wrap',
        'text-max-width': 150,
        'text-valign': 'center',
        'text-halign': 'center',
        'font-size': 12,
        'line-height': 1.3,
        color: text,
        width: 170,
        height: 58,
        'border-width': 1.5,
        'min-zoomed-font-size': 6,
      },
    },
    ...Object.entries(KIND_LOOK).map(([kind, look]) => ({
      selector: `node[kind = "${kind}"]`,
      style: { shape: look.shape, 'background-color': look.fill, 'border-color': look.line },
    })),
    { selector: 'node[kind = "router"]', style: { width: 180, height: 80 } },
    { selector: 'node.entry', style: { 'border-width': 4, 'border-style': 'double' } },
    {
      selector: 'node[badge]',
      style: {
        'background-image': 'data(badge)',
        'background-width': 22,
        'background-height': 22,
        'background-position-x': '100%',
        'background-position-y': '0%',
        'background-offset-x': 11,
        'background-offset-y': -11,
        'background-clip': 'none',
        'background-image-containment': 'over',
        'background-image-smoothing': 'yes',
        'bounds-expansion': 14,
        'border-color': bad,
        'border-width': 2.5,
      },
    },
    {
      selector: 'edge',
      style: {
        width: 2,
        'curve-style': 'bezier',
        'line-color': muted,
        'target-arrow-color': muted,
        'target-arrow-shape': 'triangle',
        'arrow-scale': 1.1,
        label: 'data(display)',
        'font-size': 11,
        color: themeText,
        'text-background-color': surface,
        'text-background-opacity': 0.9,
        'text-background-padding': 2,
        'text-rotation': 'autorotate',
        'min-zoomed-font-size': 7,
      },
    },
    { selector: 'edge[on = "failure"]', style: { 'line-color': bad, 'target-arrow-color': bad, 'line-style': 'dashed' } },
    { selector: 'edge[on = "rejected"]', style: { 'line-color': warn, 'target-arrow-color': warn, 'line-style': 'dashed' } },
    { selector: 'edge[?loop]', style: { 'line-style': 'dotted', width: 2.5 } },
    { selector: 'edge[badge]', style: { 'line-color': bad, 'target-arrow-color': bad, width: 3 } },
  ];
  for (const [status, [fillVar, lineVar]] of Object.entries(STATUS_VARS)) {
    style.push({
      selector: `node.st-${status}`,
      style: {
        'background-color': cssVar(fillVar, '#eee'),
        'border-color': cssVar(lineVar, '#666'),
        'border-width': 4,
        color: themeText,
      },
    });
  }
  style.push(
    { selector: 'node.st-running', style: { 'border-style': 'dashed' } },
    { selector: 'node.st-skipped, node.st-cancelled', style: { opacity: 0.65 } },
    {
      selector: ':selected',
      style: {
        'overlay-color': accent,
        'overlay-opacity': 0.12,
        'overlay-padding': 6,
        'border-color': accent,
        'line-color': accent,
        'target-arrow-color': accent,
      },
    },
    // edgehandles' preview while drawing an edge
    { selector: '.eh-ghost-node', style: { opacity: 0, label: '', width: 1, height: 1 } },
    {
      selector: '.eh-ghost-edge, .eh-preview',
      style: { 'line-color': accent, 'target-arrow-color': accent, 'line-style': 'dashed', label: '' },
    },
    { selector: '.eh-hover', style: { 'border-color': accent, 'border-width': 4 } },
  );
  return style;
}
