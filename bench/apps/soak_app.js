'use strict';
/**
 * soak.py's app: bench/apps/app.js unchanged (same HTTP behaviour, same polite drain), plus one
 * message handler for the output-flood chaos event:
 *
 *   herd send soak '{"flood":N}'  -> this worker prints N lines "soak-flood <pid> <i> <padding>"
 *                                    on stdout.
 *
 * The lines go out in chunks of FLOOD_CHUNK lines with setImmediate() between them, so the event
 * loop keeps serving requests and answering herd's watchdog pings while it floods. (A pipe
 * write in Node on Linux is synchronous: if herd stops reading, a chunk blocks this worker; that
 * is exactly the back-pressure the flood is meant to put on the supervisor.)
 */
require('./app.js');

const FLOOD_CHUNK = 500;
const PAD = 'x'.repeat(60);
let flooding = 0; // lines still to print (a second flood message adds to the first)

function floodStep() {
  const n = Math.min(FLOOD_CHUNK, flooding);
  let text = '';
  for (let i = 0; i < n; i++) text += `soak-flood ${process.pid} ${flooding - i} ${PAD}\n`;
  flooding -= n;
  process.stdout.write(text);
  if (flooding > 0) setImmediate(floodStep);
}

process.on('message', (m) => {
  if (typeof m === 'string') {
    try { m = JSON.parse(m); } catch { return; }
  }
  if (!m || typeof m !== 'object') return;
  const n = Number(m.flood);
  if (!Number.isInteger(n) || n <= 0 || n > 10_000_000) return;
  const idle = flooding === 0;
  flooding += n;
  if (idle) setImmediate(floodStep);
});
