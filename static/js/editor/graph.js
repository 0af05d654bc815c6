// The canvas: a Cytoscape graph that mirrors the workflow spec.
//
// Each node carries its spec dict in data.spec (never mutated: every change replaces it), each
// edge its spec dict ({source, target, on, condition, ...}). `seq` keeps the spec's order, which
// matters (the first node is the entry when none is set; a router tries its edges in order), so
// renaming a node (remove + add in Cytoscape) does not move it. Positions are layout only: they
// go to Workflow.layout, never into the spec.

import cytoscape from '../../vendor/cytoscape-3.34.4/cytoscape.esm.min.mjs';
import { problemBadge, STATUSES, stylesheet } from './style.js';

// The vendored UMD plugins (loaded as classic scripts before this module) expose globals.
cytoscape.use(window.cytoscapeEdgehandles);
cytoscape.use(window.cytoscapeDagre);

const STATUS_CLASSES = STATUSES.map((s) => `st-${s}`).join(' ');

function short(text, max = 32) {
  const value = String(text ?? '');
  return value.length > max ? `${value.slice(0, max - 1)}…` : value;
}

function count(list) {
  return Array.isArray(list) ? list.length : 0;
}

export function nodeDisplay(spec) {
  const detail = {
    agent: () => spec.agent || 'no agent yet',
    tool: () => spec.tool || 'no tool yet',
    router: () => (spec.agent ? `LLM: ${spec.agent}` : 'rules on edges'),
    parallel: () => 'fan-out',
    join: () => (spec.on_branch_failure === 'continue' ? 'fan-in, tolerant' : 'fan-in'),
    supervisor: () => `${spec.agent || '?'} + ${count(spec.workers)} workers`,
    vote: () => `${count(spec.agents)} voters, judge ${spec.judge || '?'}`,
    debate: () => `${count(spec.agents)} debaters, judge ${spec.judge || '?'}`,
    subworkflow: () => spec.workflow || 'no workflow yet',
    approval: () => spec.title || 'human approval',
  }[spec.kind];
  const title = short(spec.label || spec.id, 28);
  return `${title}\n${spec.kind} · ${short(detail ? detail() : '', 30)}`;
}

export function conditionText(condition) {
  if (!condition || typeof condition !== 'object') return '';
  const op = condition.op || 'eq';
  if (op === 'exists' || op === 'truthy') return `${condition.path} ${op}`;
  return `${condition.path} ${op} ${JSON.stringify(condition.value)}`;
}

export function edgeDisplay(spec) {
  const parts = [];
  if (spec.label) parts.push(spec.label);
  else if (spec.condition) parts.push(conditionText(spec.condition));
  if (spec.default) parts.push('default');
  if (spec.on && spec.on !== 'success') parts.push(`on ${spec.on}`);
  if (spec.max_iterations) parts.push(`loop max ${spec.max_iterations}`);
  return short(parts.join(' · '), 48);
}

export class Graph {
  constructor(container) {
    this.cy = cytoscape({
      container,
      style: stylesheet(),
      minZoom: 0.08,
      maxZoom: 2.5,
      boxSelectionEnabled: true,
    });
    this.meta = {};
    // Spec entries the canvas cannot draw (no id, duplicate id, an edge to a missing node) are
    // kept and written back unchanged, so the validator can name them and nothing is lost.
    this.undrawableNodes = [];
    this.undrawableEdges = [];
    this.seq = 0;
    this.edgeSeq = 0;
  }

  nodeData(spec, seq) {
    return { id: spec.id, kind: spec.kind, spec, seq, display: nodeDisplay(spec) };
  }

  edgeData(spec, id, seq) {
    return {
      id, seq, spec, source: spec.source, target: spec.target,
      on: spec.on || 'success', loop: Boolean(spec.max_iterations), display: edgeDisplay(spec),
    };
  }

  newEdgeId() {
    this.edgeSeq += 1;
    return `e${this.edgeSeq}`;
  }

  // Replace the whole graph. Returns true when some node had no stored position.
  load(spec, layout = {}) {
    const { nodes = [], edges = [], ...meta } = spec || {};
    const state = {
      meta,
      nodes: [],
      edges: [],
      undrawableNodes: [],
      undrawableEdges: [],
    };
    const ids = new Set();
    let missing = false;
    (Array.isArray(nodes) ? nodes : []).forEach((node, index) => {
      if (!node || typeof node.id !== 'string' || !node.id || ids.has(node.id)) {
        state.undrawableNodes.push(node);
        return;
      }
      ids.add(node.id);
      const pos = layout[node.id];
      if (!pos) missing = true;
      state.nodes.push({ spec: node, pos: pos || { x: (index % 6) * 220, y: Math.floor(index / 6) * 120 } });
    });
    (Array.isArray(edges) ? edges : []).forEach((edge) => {
      if (edge && ids.has(edge.source) && ids.has(edge.target)) {
        state.edges.push({ id: this.newEdgeId(), spec: edge });
      } else {
        state.undrawableEdges.push(edge);
      }
    });
    this.apply(state);
    return missing && state.nodes.length > 0;
  }

  // An undo/redo snapshot: everything that makes the draft (spec + layout), as a string.
  snapshot() {
    return JSON.stringify({
      meta: this.meta,
      nodes: this.sorted(this.cy.nodes()).map((n) => ({ spec: n.data('spec'), pos: roundPos(n.position()) })),
      edges: this.sorted(this.cy.edges()).map((e) => ({ id: e.id(), spec: e.data('spec') })),
      undrawableNodes: this.undrawableNodes,
      undrawableEdges: this.undrawableEdges,
    });
  }

  restore(snapshot) {
    const selected = this.cy.$(':selected').map((el) => el.id());
    this.apply(JSON.parse(snapshot));
    selected.forEach((id) => this.cy.getElementById(id).select());
  }

  apply(state) {
    this.meta = state.meta || {};
    this.undrawableNodes = state.undrawableNodes || [];
    this.undrawableEdges = state.undrawableEdges || [];
    const elements = [];
    state.nodes.forEach(({ spec, pos }) => {
      this.seq += 1;
      elements.push({ group: 'nodes', data: this.nodeData(spec, this.seq), position: { ...pos } });
    });
    state.edges.forEach(({ id, spec }) => {
      this.seq += 1;
      const edgeNumber = Number(String(id).slice(1));
      if (edgeNumber > this.edgeSeq) this.edgeSeq = edgeNumber;
      elements.push({ group: 'edges', data: this.edgeData(spec, id, this.seq) });
    });
    this.cy.batch(() => {
      this.cy.elements().remove();
      this.cy.add(elements);
    });
    this.refreshEntry();
  }

  sorted(collection) {
    return collection.toArray().sort((a, b) => a.data('seq') - b.data('seq'));
  }

  // The spec as the server stores it, and the id of each spec edge (index -> canvas edge id).
  toSpec() {
    const nodes = this.sorted(this.cy.nodes());
    const edges = this.sorted(this.cy.edges());
    return {
      spec: {
        ...this.meta,
        nodes: [...nodes.map((n) => n.data('spec')), ...this.undrawableNodes],
        edges: [...edges.map((e) => e.data('spec')), ...this.undrawableEdges],
      },
      edgeIds: edges.map((e) => e.id()),
    };
  }

  spec() {
    return this.toSpec().spec;
  }

  layout() {
    const layout = {};
    this.cy.nodes().forEach((n) => { layout[n.id()] = roundPos(n.position()); });
    return layout;
  }

  uniqueId(kind) {
    const taken = new Set(this.undrawableNodes.map((n) => n && n.id));
    let i = 1;
    while (this.cy.getElementById(`${kind}_${i}`).nonempty() || taken.has(`${kind}_${i}`)) i += 1;
    return `${kind}_${i}`;
  }

  addNode(kind, position) {
    this.seq += 1;
    const spec = { id: this.uniqueId(kind), kind };
    const node = this.cy.add({ group: 'nodes', data: this.nodeData(spec, this.seq), position });
    this.cy.$(':selected').unselect();
    node.select();
    this.refreshEntry();
    return node;
  }

  addEdge(sourceId, targetId) {
    this.seq += 1;
    const spec = { source: sourceId, target: targetId };
    return this.cy.add({ group: 'edges', data: this.edgeData(spec, this.newEdgeId(), this.seq) });
  }

  // Turn an edge drawn with edgehandles into a spec edge.
  adoptEdge(edge) {
    this.seq += 1;
    const spec = { source: edge.source().id(), target: edge.target().id() };
    edge.data(this.edgeData(spec, edge.id(), this.seq));
  }

  removeSelected() {
    const selected = this.cy.$(':selected');
    const n = selected.length;
    selected.remove();
    this.refreshEntry();
    return n;
  }

  nodeSpec(id) {
    const node = this.cy.getElementById(id);
    return node.nonempty() && node.isNode() ? node.data('spec') : null;
  }

  edgeSpec(id) {
    const edge = this.cy.getElementById(id);
    return edge.nonempty() && edge.isEdge() ? edge.data('spec') : null;
  }

  // Apply a node's new spec; returns its (possibly new) id.
  updateNode(oldId, spec) {
    const node = this.cy.getElementById(oldId);
    if (node.empty()) return null;
    if (spec.id === oldId) {
      node.data({ spec, kind: spec.kind, display: nodeDisplay(spec) });
      return oldId;
    }
    // Cytoscape ids are immutable: re-create the node and its edges, keeping their order.
    const seq = node.data('seq');
    const pos = { ...node.position() };
    const selected = node.selected();
    const edges = node.connectedEdges().map((e) => {
      const edgeSpec = { ...e.data('spec') };
      if (edgeSpec.source === oldId) edgeSpec.source = spec.id;
      if (edgeSpec.target === oldId) edgeSpec.target = spec.id;
      return { id: e.id(), seq: e.data('seq'), spec: edgeSpec };
    });
    if (this.meta.entry === oldId) this.meta = { ...this.meta, entry: spec.id };
    this.cy.batch(() => {
      node.remove();
      const added = this.cy.add({ group: 'nodes', data: this.nodeData(spec, seq), position: pos });
      edges.forEach((e) => this.cy.add({ group: 'edges', data: this.edgeData(e.spec, e.id, e.seq) }));
      if (selected) added.select();
    });
    this.refreshEntry();
    return spec.id;
  }

  updateEdge(id, spec) {
    const edge = this.cy.getElementById(id);
    if (edge.empty()) return;
    edge.data(this.edgeData(spec, id, edge.data('seq')));
  }

  setMeta(top) {
    const { nodes, edges, ...meta } = top;
    this.meta = meta;
    this.refreshEntry();
  }

  entryId() {
    if (this.meta.entry) return this.meta.entry;
    const first = this.sorted(this.cy.nodes())[0];
    return first ? first.id() : null;
  }

  refreshEntry() {
    this.cy.nodes('.entry').removeClass('entry');
    const id = this.entryId();
    if (id) this.cy.getElementById(id).addClass('entry');
  }

  // Problems from the server: badges on nodes and edges. `edgeIds` maps a spec edge index to
  // the canvas edge it came from (at the time the problems were computed).
  setProblems(problems, edgeIds) {
    const byElement = new Map();
    for (const problem of problems) {
      let id = null;
      if (problem.node) id = problem.node;
      else if (problem.edge !== null && problem.edge !== undefined) id = edgeIds[problem.edge];
      if (!id) continue;
      if (!byElement.has(id)) byElement.set(id, []);
      byElement.get(id).push(problem.message);
    }
    this.cy.batch(() => {
      this.cy.elements('[badge]').removeData('badge problems');
      for (const [id, messages] of byElement) {
        const el = this.cy.getElementById(id);
        if (el.empty()) continue;
        el.data({ badge: el.isNode() ? problemBadge(messages.length) : 'x', problems: messages });
      }
    });
  }

  setStatuses(statuses) {
    this.cy.batch(() => {
      this.cy.nodes().removeClass(STATUS_CLASSES);
      for (const [nodeId, info] of Object.entries(statuses)) {
        this.cy.getElementById(nodeId).addClass(`st-${info.status}`);
      }
    });
  }

  clearStatuses() {
    this.cy.nodes().removeClass(STATUS_CLASSES);
  }

  focus(id) {
    const el = this.cy.getElementById(id);
    if (el.empty()) return;
    this.cy.$(':selected').unselect();
    el.select();
    this.cy.animate({ center: { eles: el }, duration: 200 });
  }
}

function roundPos(pos) {
  return { x: Math.round(pos.x * 10) / 10, y: Math.round(pos.y * 10) / 10 };
}
