// The workflow editor page: wires the canvas, palette, edge drawing, undo/redo, autosave, side
// panel, publishing and run watching together. Each concern lives in its own module.

import { request } from './api.js';
import { Autosave } from './autosave.js';
import { Graph } from './graph.js';
import { setupEdgeHandles } from './handles.js';
import { History } from './history.js';
import { autoLayout, fit, zoomBy } from './layout.js';
import { setupPalette } from './palette.js';
import { Panel } from './panel.js';
import { RunWatch } from './runwatch.js';

const config = JSON.parse(document.getElementById('editor-config').textContent);
const root = document.getElementById('editor');
const container = document.getElementById('canvas');
const graph = new Graph(container);
const { cy } = graph;
const history = new History();

const saveStatus = root.querySelector('#save-status');
const message = root.querySelector('#editor-message');
const versionLabel = root.querySelector('#version-label');
const publishForm = root.querySelector('#publish-form');
const publishButton = publishForm.querySelector('button[type="submit"]');

function say(text, level = 'info') {
  message.textContent = text;
  message.dataset.level = level;
  message.hidden = !text;
}

function setSaveStatus(state, text) {
  saveStatus.dataset.state = state;
  saveStatus.textContent = text;
  if (state === 'conflict') {
    say(text, 'error');
    const reload = document.createElement('a');
    reload.href = window.location.href;
    reload.textContent = ' Reload';
    message.append(reload);
  }
}

function showProblems(problems, edgeIds) {
  graph.setProblems(problems, edgeIds);
  panel.renderProblems(problems, edgeIds);
  publishButton.disabled = problems.length > 0;
  publishButton.title = problems.length
    ? `Fix the ${problems.length} problem${problems.length === 1 ? '' : 's'} first`
    : 'Freeze this draft as a new version';
}

function showDraftState(state, edgeIds) {
  showProblems(state.problems, edgeIds);
  if (state.latest_version) {
    versionLabel.textContent = state.differs_from_latest
      ? `Draft changed since version ${state.latest_version}`
      : `Same as version ${state.latest_version}`;
  } else {
    versionLabel.textContent = 'Never published';
  }
}

const autosave = new Autosave({
  url: config.urls.draft,
  revision: config.revision,
  payload() {
    const { spec, edgeIds } = graph.toSpec();
    return { spec, layout: graph.layout(), edgeIds };
  },
  onSaved: showDraftState,
  onStatus: setSaveStatus,
});

const panel = new Panel({
  root: root.querySelector('#side-panel'),
  graph,
  urls: config.urls,
  onChange: () => commit(),
});

new RunWatch({ graph, root: root.querySelector('#tab-run') });

function updateUndoButtons() {
  root.querySelector('[data-action="undo"]').disabled = !history.canUndo();
  root.querySelector('[data-action="redo"]').disabled = !history.canRedo();
}

// Record the current draft as one undoable change and autosave it. Several events of one
// gesture (moving ten selected nodes fires ten `dragfree`) arrive in the same tick: one commit.
let commitQueued = false;
let busy = 0; // gestures still running (an animated auto-layout)
function commit() {
  // While an animated layout runs, positions are in flux: its own commit at the end records
  // everything, including edits that landed meanwhile, as one undoable step.
  if (commitQueued || busy > 0) return;
  commitQueued = true;
  setTimeout(() => {
    commitQueued = false;
    if (history.push(graph.snapshot())) {
      autosave.schedule();
      updateUndoButtons();
    }
  }, 0);
}

function travel(snapshot) {
  if (snapshot === null) return;
  graph.restore(snapshot);
  autosave.schedule();
  updateUndoButtons();
  syncPanel(true);
}

// The inspector follows the selection.
let selectionTimer = null;
function syncPanel(force = false) {
  const selected = cy.$(':selected');
  if (selected.length > 1) {
    panel.showMany(selected.length);
    return;
  }
  const target = selected.length === 0 ? 'workflow' : selected.isNode() ? 'node' : 'edge';
  const id = selected.length ? selected.id() : null;
  if (!force && panel.target === target && panel.elementId === id) return;
  panel.show(target, id);
  if (selected.length) panel.selectTab('inspector');
}
cy.on('select unselect', () => {
  clearTimeout(selectionTimer);
  selectionTimer = setTimeout(() => syncPanel(), 30);
});

function deleteSelected() {
  if (graph.removeSelected()) {
    commit();
    syncPanel(true);
  }
}

cy.on('dragfree', 'node', () => commit());

setupPalette(root.querySelector('#palette'), container, {
  cy,
  onAdd(kind, position) {
    graph.addNode(kind, position);
    commit();
  },
});

const handles = setupEdgeHandles(cy, root.querySelector('#canvas-overlay'), {
  newEdgeId: () => graph.newEdgeId(),
  onConnect(edge) {
    graph.adoptEdge(edge);
    commit();
    cy.$(':selected').unselect();
    edge.select();
  },
});

const actions = {
  undo: () => travel(history.undo()),
  redo: () => travel(history.redo()),
  delete: deleteSelected,
  layout: async () => {
    busy += 1;
    try {
      await autoLayout(cy);
    } finally {
      busy -= 1;
    }
    commit();
  },
  fit: () => fit(cy),
  'zoom-in': () => zoomBy(cy, 1.25),
  'zoom-out': () => zoomBy(cy, 0.8),
  connect: (button) => {
    const on = button.getAttribute('aria-pressed') !== 'true';
    button.setAttribute('aria-pressed', String(on));
    handles.setDrawMode(on);
    cy.autoungrabify(on);
  },
};
root.querySelectorAll('[data-action]').forEach((button) => {
  button.addEventListener('click', () => actions[button.dataset.action](button));
});

// Cytoscape cancels the mousedown, so clicking the canvas would leave the focus in a panel
// field and send Delete or Ctrl+Z to that field: move the focus to the canvas instead.
container.tabIndex = 0;
container.addEventListener('mousedown', () => container.focus({ preventScroll: true }), true);

document.addEventListener('keydown', (event) => {
  if (event.target.closest('input, textarea, select, [contenteditable="true"]')) return;
  const mod = event.ctrlKey || event.metaKey;
  const key = event.key.toLowerCase();
  if (mod && key === 'z') {
    event.preventDefault();
    if (event.shiftKey) actions.redo();
    else actions.undo();
  } else if (mod && key === 'y') {
    event.preventDefault();
    actions.redo();
  } else if (mod && key === 's') {
    event.preventDefault();
    autosave.flush();
  } else if ((key === 'delete' || key === 'backspace') && cy.$(':selected').nonempty()) {
    event.preventDefault();
    deleteSelected();
  }
});

publishForm.addEventListener('submit', async (event) => {
  event.preventDefault();
  publishButton.disabled = true;
  say('Publishing…');
  await autosave.flush();
  if (autosave.dirty) {
    say('The draft could not be saved, so it was not published.', 'error');
    publishButton.disabled = false;
    return;
  }
  const result = await request(config.urls.publish, {
    method: 'POST', form: new FormData(publishForm),
  });
  if (result.ok) {
    say(`Published version ${result.data.version}.`, 'success');
    publishForm.reset();
    showDraftState(result.data, graph.toSpec().edgeIds);
  } else {
    say(result.data.error || 'Publishing failed.', 'error');
    publishButton.disabled = false;
    if (result.data.problems) {
      showProblems(result.data.problems, graph.toSpec().edgeIds);
      panel.selectTab('problems');
    }
  }
});

// A run of the draft must see the draft as it is on screen: save before the request goes out.
document.body.addEventListener('htmx:confirm', (event) => {
  if (!event.detail.elt.matches('.js-run-form')) return;
  if (!autosave.dirty && !autosave.inFlight) return;
  event.preventDefault();
  autosave.flush().then(() => event.detail.issueRequest(true));
});

// The run form's fields come from the input schema: reload it when that changed.
let runSchema = JSON.stringify(graph.meta.input_schema || null);
root.querySelector('[data-tab="run"]').addEventListener('click', () => {
  const schema = JSON.stringify(graph.meta.input_schema || null);
  if (schema !== runSchema) {
    runSchema = schema;
    window.htmx.trigger(document.body, 'baton:refresh-run-form');
  }
});

window.addEventListener('beforeunload', (event) => {
  if (autosave.dirty || autosave.inFlight) {
    event.preventDefault();
    event.returnValue = '';
  }
});

async function start() {
  const needsLayout = graph.load(config.spec, config.layout);
  if (needsLayout) await autoLayout(cy, { animate: false });
  else fit(cy);
  history.reset(graph.snapshot());
  updateUndoButtons();
  showDraftState(config, graph.toSpec().edgeIds);
  panel.show('workflow');
  root.dataset.ready = 'true';
}

// For the browser tests and for poking around in the console.
window.batonEditor = {
  graph,
  history,
  autosave,
  panel,
  // Nothing left to record or save.
  idle: () => busy === 0 && !commitQueued && !autosave.dirty && !autosave.inFlight,
};
start();
