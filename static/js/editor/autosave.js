// Debounced autosave of the draft. One save is in flight at a time; changes made meanwhile are
// saved right after it. The server answers with the spec's problems. A 409 means the workflow
// changed elsewhere: saving stops (nothing is overwritten) until the page is reloaded.

import { request } from './api.js';

export class Autosave {
  constructor({ url, revision, payload, onSaved, onStatus, delay = 700 }) {
    this.url = url;
    this.revision = revision;
    this.payload = payload; // () => {spec, layout, edgeIds}
    this.onSaved = onSaved; // (response data, edgeIds) => void
    this.onStatus = onStatus; // (state, message) => void
    this.delay = delay;
    this.timer = null;
    this.inFlight = null;
    this.dirty = false;
    this.stopped = false;
    this.failures = 0;
  }

  schedule() {
    if (this.stopped) return;
    this.dirty = true;
    this.onStatus('dirty', 'Unsaved changes');
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.save(), this.delay);
  }

  // Save now (if anything changed) and resolve once the server has everything.
  async flush() {
    clearTimeout(this.timer);
    if (this.inFlight) await this.inFlight;
    if (this.dirty && !this.stopped) await this.save();
    return !this.dirty;
  }

  async save() {
    clearTimeout(this.timer);
    if (this.inFlight) {
      await this.inFlight;
      if (!this.dirty) return;
    }
    this.inFlight = this.send();
    try {
      await this.inFlight;
    } finally {
      this.inFlight = null;
    }
  }

  async send() {
    const { spec, layout, edgeIds } = this.payload();
    this.dirty = false;
    this.onStatus('saving', 'Saving…');
    let result;
    try {
      result = await request(this.url, {
        method: 'PUT', json: { spec, layout, revision: this.revision },
      });
    } catch (error) {
      result = { ok: false, status: 0, data: { error: 'The server cannot be reached.' } };
    }
    if (result.ok) {
      this.failures = 0;
      this.revision = result.data.revision;
      this.onSaved(result.data, edgeIds);
      if (!this.dirty) this.onStatus('saved', 'All changes saved');
      return;
    }
    this.dirty = true;
    if (result.status === 409) {
      this.stopped = true;
      this.onStatus('conflict', result.data.error);
      return;
    }
    if (result.status === 400 || result.status === 403 || result.status === 404) {
      this.stopped = true;
      this.onStatus('error', `Not saved: ${result.data.error || result.status}`);
      return;
    }
    // The server or the network failed: try again, waiting longer each time.
    this.failures += 1;
    const wait = Math.min(30000, 1000 * 2 ** this.failures);
    this.onStatus('error', `Not saved (${result.data.error}); retrying in ${Math.round(wait / 1000)} s`);
    this.timer = setTimeout(() => this.save(), wait);
  }
}
