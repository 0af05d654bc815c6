// Undo/redo over whole snapshots of the draft (spec + positions as one string). Snapshots are
// simple and exact: undo can never drift from what the user saw, and 300 nodes make a string of
// a few hundred kilobytes at most, so a bounded stack stays small.

export class History {
  constructor(limit = 150) {
    this.limit = limit;
    this.stack = [];
    this.index = -1;
  }

  // Record a new state; returns false when nothing changed since the current one.
  push(snapshot) {
    if (snapshot === this.stack[this.index]) return false;
    this.stack.splice(this.index + 1);
    this.stack.push(snapshot);
    if (this.stack.length > this.limit) this.stack.shift();
    this.index = this.stack.length - 1;
    return true;
  }

  reset(snapshot) {
    this.stack = [snapshot];
    this.index = 0;
  }

  canUndo() {
    return this.index > 0;
  }

  canRedo() {
    return this.index < this.stack.length - 1;
  }

  undo() {
    if (!this.canUndo()) return null;
    this.index -= 1;
    return this.stack[this.index];
  }

  redo() {
    if (!this.canRedo()) return null;
    this.index += 1;
    return this.stack[this.index];
  }
}
