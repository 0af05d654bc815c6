// The side panel: tabs (Inspector, Problems, Run), the server-rendered inspector form for the
// selected node / edge / workflow, and the problems list.
//
// The inspector is htmx: opening posts the element's JSON and the draft to the server, which
// renders the form; each edit posts the form (plus the same JSON, added here at request time so
// it is always current) and the server answers with error slots and, when the edit is valid, a
// `baton:element-changed` event carrying the element's new JSON. `key` names the element the
// form was opened for, so a late answer never lands on another element.

export class Panel {
  constructor({ root, graph, urls, onChange }) {
    this.root = root;
    this.body = root.querySelector('#panel-body');
    this.graph = graph;
    this.urls = urls;
    this.onChange = onChange;
    this.target = 'workflow';
    this.elementId = null;
    this.setupTabs();
    this.setupHtmx();
    this.setupChips();
  }

  key() {
    return `${this.target}:${this.elementId || ''}`;
  }

  element() {
    if (this.target === 'node') return this.graph.nodeSpec(this.elementId);
    if (this.target === 'edge') return this.graph.edgeSpec(this.elementId);
    return null;
  }

  // Show the form for a node, an edge, or (target "workflow") the workflow settings.
  show(target, elementId = null) {
    this.target = target;
    this.elementId = elementId;
    delete this.body.dataset.key;
    const values = { target, key: this.key(), spec: JSON.stringify(this.graph.spec()) };
    const element = this.element();
    if (element) values.element = JSON.stringify(element);
    window.htmx.ajax('POST', this.urls.panel, { target: this.body, swap: 'innerHTML', values });
  }

  showMany(count) {
    this.target = 'many';
    this.elementId = null;
    this.body.replaceChildren();
    const p = document.createElement('p');
    p.className = 'muted';
    p.textContent = `${count} elements selected. Press Delete to remove them, or drag to move them together.`;
    this.body.append(p);
  }

  setupHtmx() {
    // Which element the inspector shows, once htmx has wired up its form (tests wait for it).
    this.body.addEventListener('htmx:afterSettle', (event) => {
      if (event.detail.elt === this.body) this.body.dataset.key = this.key();
    });
    document.body.addEventListener('htmx:configRequest', (event) => {
      const elt = event.detail.elt;
      if (!elt.closest || !elt.closest('[data-panel-request]')) return;
      const params = event.detail.parameters;
      params.key = this.key();
      params.spec = JSON.stringify(this.graph.spec());
      const element = this.element();
      if (element) params.element = JSON.stringify(element);
    });
    document.body.addEventListener('baton:element-changed', (event) => {
      const { subject: target, key, element } = event.detail;
      if (key !== this.key()) return;
      if (target === 'node') {
        const newId = this.graph.updateNode(this.elementId, element);
        if (newId && newId !== this.elementId) this.elementId = newId;
      } else if (target === 'edge') {
        this.graph.updateEdge(this.elementId, element);
      } else if (target === 'workflow') {
        this.graph.setMeta(element);
      }
      this.onChange(`panel:${target}`);
    });
  }

  // Clicking a {variable} chip inserts it into the prompt at the caret.
  setupChips() {
    this.body.addEventListener('click', (event) => {
      const chip = event.target.closest('[data-insert]');
      if (chip) {
        const field = this.body.querySelector(chip.dataset.into || 'textarea[name="prompt"]');
        if (!field) return;
        const start = field.selectionStart ?? field.value.length;
        const end = field.selectionEnd ?? field.value.length;
        field.setRangeText(chip.dataset.insert, start, end, 'end');
        field.focus();
        field.dispatchEvent(new Event('input', { bubbles: true }));
        return;
      }
      const jump = event.target.closest('[data-select-edge]');
      if (jump) this.graph.focus(jump.dataset.selectEdge);
    });
  }

  setupTabs() {
    this.tabs = [...this.root.querySelectorAll('[role="tab"]')];
    this.tabs.forEach((tab) => {
      tab.addEventListener('click', () => this.selectTab(tab.dataset.tab));
    });
  }

  selectTab(name) {
    this.tabs.forEach((tab) => {
      const on = tab.dataset.tab === name;
      tab.setAttribute('aria-selected', String(on));
      this.root.querySelector(`#${tab.getAttribute('aria-controls')}`).hidden = !on;
    });
  }

  // The problems tab: one line per problem; a click selects the node or edge it belongs to.
  renderProblems(problems, edgeIds) {
    const list = this.root.querySelector('#problems-list');
    const counter = this.root.querySelector('#problems-count');
    counter.textContent = String(problems.length);
    counter.classList.toggle('badge-empty', problems.length === 0);
    list.replaceChildren();
    if (!problems.length) {
      const li = document.createElement('li');
      li.className = 'muted';
      li.textContent = 'No problems: this draft can be published.';
      list.append(li);
      return;
    }
    for (const problem of problems) {
      const li = document.createElement('li');
      const target = problem.node || (problem.edge !== null ? edgeIds[problem.edge] : null);
      if (target && this.graph.cy.getElementById(target).nonempty()) {
        const button = document.createElement('button');
        button.type = 'button';
        button.className = 'problem-link';
        button.textContent = problem.text;
        button.addEventListener('click', () => this.graph.focus(target));
        li.append(button);
      } else {
        li.textContent = problem.text;
      }
      list.append(li);
    }
  }
}
