// Watching a run started from the editor: poll the run-status endpoint every 500 ms while the
// run is active and colour the canvas nodes by their latest step's status, like the dashboard.

import { request } from './api.js';

const INTERVAL_MS = 500;

export class RunWatch {
  constructor({ graph, root }) {
    this.graph = graph;
    this.root = root;
    this.timer = null;
    this.runId = null;
    document.body.addEventListener('baton:run-started', (event) => this.start(event.detail));
    root.addEventListener('click', (event) => {
      if (event.target.closest('[data-clear-run]')) this.clear();
    });
  }

  start({ run_id: runId, status_url: statusUrl }) {
    this.stop();
    this.runId = runId;
    this.statusUrl = statusUrl;
    this.failures = 0;
    this.graph.clearStatuses();
    this.poll();
  }

  async poll() {
    const runId = this.runId;
    let result;
    try {
      result = await request(this.statusUrl);
    } catch (error) {
      result = { ok: false, data: {} };
    }
    if (runId !== this.runId) return; // another run was started meanwhile
    if (result.ok) {
      this.failures = 0;
      this.graph.setStatuses(result.data.nodes);
      this.render(result.data.run);
      if (!result.data.run.active) return;
    } else {
      this.failures += 1;
    }
    const wait = result.ok ? INTERVAL_MS : Math.min(10000, INTERVAL_MS * 2 ** this.failures);
    this.timer = setTimeout(() => this.poll(), wait);
  }

  render(run) {
    const card = this.root.querySelector(`[data-run-card="${run.id}"]`);
    if (!card) return;
    const status = card.querySelector('[data-run-status]');
    status.textContent = run.status_label;
    status.className = `status-${run.status}`;
    card.dataset.status = run.status;
    const detail = card.querySelector('[data-run-detail]');
    detail.textContent = run.error || run.blocked_on || '';
    detail.hidden = !detail.textContent;
    const result = card.querySelector('[data-run-result]');
    result.textContent = run.result;
    result.hidden = !run.result;
  }

  stop() {
    clearTimeout(this.timer);
    this.timer = null;
  }

  clear() {
    this.stop();
    this.runId = null;
    this.graph.clearStatuses();
    const card = this.root.querySelector('[data-run-card]');
    if (card) card.remove();
  }
}
