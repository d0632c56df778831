// Shared state done right: every worker keeps its state in Redis, not in its own memory.
//
//   npm ci --prefix examples/counter
//   REDIS_URL=redis://127.0.0.1:6379 herd run -i 2 examples/counter/app.js
//
//   POST /count        INCR the Redis counter (and this session's count, in the same MULTI):
//                      {"count": n, "pid": …, "session": {"count": k, …}, "memoryCount": m}
//   GET  /count        the Redis counter: {"count": n, "pid": …}
//   GET  /memory-count the anti-pattern: a counter in this worker's memory, {"count": m, "pid": …}
//                      (POST /count bumps it too). Under `herd run -i 2` every worker has its
//                      own, and none of them is the real count.
//   GET  /health       200 {"status":"ok",…} while Redis is reachable, else 503
//
// Environment: PORT (3000), REDIS_URL (redis://127.0.0.1:6379), SESSION_SECRET (must be the
// same on every host behind one balancer), RATE_LIMIT (POST /count per client per
// RATE_WINDOW_S seconds; 0 turns it off; default 100 per 10 s), TRUST_PROXY (Express's
// `trust proxy`, e.g. `loopback` or the balancer's address, so the limiter sees the client's
// address from X-Forwarded-For), REDIS_TIMEOUT_MS (1000: the longest a request waits on Redis).
//
// Redis unreachable: one log line per outage (not a stack trace per request), every request
// that needs Redis answers 503 JSON at once (the client's offline queue is off, so nothing
// waits for a reconnect), and the worker tells herd it is not ready
// (`process.send({herd: 'unready', …})`); when Redis is back it says `{herd: 'ready'}`. The
// process never exits over it: an outage is not a crash loop.
'use strict';

const express = require('express');
const session = require('express-session');
const RedisStore = require('connect-redis').default;
const {
  createClient,
  ClientOfflineError,
  ClientClosedError,
  SocketClosedUnexpectedlyError,
  ConnectionTimeoutError,
} = require('redis');

const port = Number(process.env.PORT || 3000);
const redisUrl = process.env.REDIS_URL || 'redis://127.0.0.1:6379';
const rateLimit = Number(process.env.RATE_LIMIT ?? 100);
const rateWindowS = Number(process.env.RATE_WINDOW_S || 10);
const redisTimeoutMs = Number(process.env.REDIS_TIMEOUT_MS || 1000);
const sessionTtlS = 24 * 3600;
const COUNTER = 'counter:total';

if (!process.env.SESSION_SECRET && process.env.NODE_ENV === 'production') {
  console.error('SESSION_SECRET is not set: refusing to sign session cookies with the example secret');
  process.exit(1);
}
const sessionSecret = process.env.SESSION_SECRET || 'herd-example-counter-not-a-secret';

function log(msg) {
  console.log(`[counter ${process.pid}] ${msg}`);
}

// ---- herd: leave and re-enter rotation without being replaced ------------------------------

function tellHerd(msg) {
  // Under herd (or any Node cluster primary) there is an IPC channel; alone there is not.
  if (typeof process.send === 'function' && process.connected) {
    try {
      process.send(msg);
    } catch (_) {
      // The channel closed under us (herd is stopping this worker): nothing to tell.
    }
  }
}

// ---- Redis ------------------------------------------------------------------------------------

const redis = createClient({
  url: redisUrl,
  // Without this, commands issued while disconnected wait in memory for the reconnect:
  // requests would hang (and the queue would grow) instead of failing fast.
  disableOfflineQueue: true,
  socket: {
    connectTimeout: 1000,
    // Retry forever, quickly: an outage ends when Redis is back, not when we give up.
    reconnectStrategy: (retries) => Math.min(50 * (retries + 1), 500),
  },
});

let redisUp = false;
let everUp = false;
let toldUnready = false;
let outage = null; // {since, refused, reason}
let listening = false;

function redisDown(err) {
  const what = (err && (err.code || err.message)) || 'connection lost';
  if (outage) return;
  redisUp = false;
  outage = { since: Date.now(), refused: 0 };
  log(
    `Redis unreachable at ${redisUrl} (${what}): answering 503 and not ready until it returns`,
  );
  outage.reason = `redis unreachable: ${what}`;
  // Before the server listens herd does not count this worker ready anyway: the message
  // goes out once it listens (herd marks a Node worker ready on `listening`).
  if (listening) sayUnready();
}

function sayUnready() {
  if (toldUnready || !outage) return;
  toldUnready = true;
  tellHerd({ herd: 'unready', reason: outage.reason });
}

redis.on('ready', () => {
  redisUp = true;
  if (outage) {
    const s = ((Date.now() - outage.since) / 1000).toFixed(1);
    log(`Redis is back after ${s} s (${outage.refused} requests answered 503): ready again`);
    outage = null;
  } else if (!everUp) {
    log(`connected to Redis at ${redisUrl}`);
  }
  everUp = true;
  if (toldUnready) {
    toldUnready = false;
    tellHerd({ herd: 'ready' });
  }
  listenOnce();
});
// node-redis emits 'error' on every failed reconnect attempt: only the first of an outage is
// logged. (Without a listener an 'error' event would kill the process.)
redis.on('error', (err) => {
  redisDown(err);
  listenOnce();
});
redis.on('reconnecting', () => {
  if (redisUp) redisDown(new Error('connection lost'));
});

redis.connect().catch((err) => redisDown(err));

// node-redis's errors that mean "no answer from Redis" (not an error reply from it). The
// first two are raised before anything is sent: the command surely did not run.
const NOT_SENT = [ClientOfflineError, ClientClosedError];
const NO_ANSWER = [...NOT_SENT, SocketClosedUnexpectedlyError, ConnectionTimeoutError];
const isA = (err, classes) => classes.some((c) => err instanceof c);

class RedisUnavailable extends Error {
  constructor(applied, cause) {
    super('redis unavailable');
    // false: the command never left this process (offline); 'unknown': it was sent and the
    // answer was lost (Redis died or timed out mid-command).
    this.applied = applied;
    this.cause = cause;
  }
}

// One Redis call, bounded: a Redis that accepts and never answers costs a request
// REDIS_TIMEOUT_MS, not forever.
function withRedis(call) {
  if (!redisUp) return Promise.reject(new RedisUnavailable(false));
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new RedisUnavailable('unknown', new Error('timeout'))), redisTimeoutMs);
  });
  return Promise.race([call(), timeout])
    .catch((err) => {
      if (err instanceof RedisUnavailable) throw err;
      if (!isA(err, NO_ANSWER)) throw err; // Redis answered with an error, or a bug: a 500
      throw new RedisUnavailable(isA(err, NOT_SENT) ? false : 'unknown', err);
    })
    .finally(() => clearTimeout(timer));
}

// ---- the app ----------------------------------------------------------------------------------

const app = express();
app.disable('x-powered-by');
if (process.env.TRUST_PROXY) app.set('trust proxy', process.env.TRUST_PROXY);

// The anti-pattern, kept on purpose: each worker has its own copy of this number.
let memoryCount = 0;

const sessions = session({
  store: new RedisStore({
    client: redis,
    prefix: 'sess:',
    ttl: sessionTtlS,
    // A touch is one more Redis write after the answer is sent, whose failure would surface
    // as a second error on a finished response. POST /count saves the session anyway.
    disableTouch: true,
  }),
  name: 'counter.sid',
  secret: sessionSecret,
  resave: false,
  saveUninitialized: false,
  cookie: { httpOnly: true, sameSite: 'lax', maxAge: sessionTtlS * 1000 },
});

// Fixed-window limiter in Redis, so the limit holds across every worker and every host.
async function limiter(req, res, next) {
  if (!(rateLimit > 0)) return next();
  const window = Math.floor(Date.now() / 1000 / rateWindowS);
  const who = req.sessionID && req.session && req.session.created ? `s:${req.sessionID}` : `ip:${req.ip}`;
  const key = `ratelimit:${who}:${window}`;
  try {
    const [n] = await withRedis(() => redis.multi().incr(key).expire(key, rateWindowS * 2).exec());
    if (n > rateLimit) {
      res.set('Retry-After', String(rateWindowS));
      return res.status(429).json({ error: 'rate limit exceeded', limit: rateLimit, windowSeconds: rateWindowS });
    }
    return next();
  } catch (err) {
    return next(err);
  }
}

const ensureSession = (req, res, next) => {
  if (req.session.created) return next();
  req.session.created = Date.now();
  req.session.firstPid = process.pid;
  return req.session.save((err) => next(err && new RedisUnavailable(false, err)));
};

app.post('/count', sessions, limiter, ensureSession, async (req, res, next) => {
  try {
    const sessKey = `counter:session:${req.sessionID}`;
    // One MULTI: the total and this session's count move together or not at all.
    const [count, sessionCount] = await withRedis(() =>
      redis.multi().incr(COUNTER).incr(sessKey).expire(sessKey, sessionTtlS).exec(),
    );
    memoryCount += 1;
    res.json({
      count,
      pid: process.pid,
      session: { count: sessionCount, created: req.session.created, firstPid: req.session.firstPid },
      memoryCount,
    });
  } catch (err) {
    next(err);
  }
});

app.get('/count', async (req, res, next) => {
  try {
    const count = Number(await withRedis(() => redis.get(COUNTER))) || 0;
    res.json({ count, pid: process.pid });
  } catch (err) {
    next(err);
  }
});

app.get('/memory-count', (req, res) => {
  res.json({ count: memoryCount, pid: process.pid, note: 'this worker only: not shared' });
});

app.get('/health', (req, res) => {
  const body = { status: redisUp ? 'ok' : 'redis unreachable', pid: process.pid, redis: redisUp ? 'up' : 'down' };
  res.status(redisUp ? 200 : 503).json(body);
});

app.use((req, res) => res.status(404).json({ error: 'not found' }));

// Redis trouble: a short 503, counted, never a stack trace per request.
// eslint-disable-next-line no-unused-vars
app.use((err, req, res, next) => {
  let unavailable = err instanceof RedisUnavailable ? err : null;
  // The session store's errors arrive as they are: a failed session read is the same outage.
  if (!unavailable && (!redisUp || isA(err, NO_ANSWER))) {
    unavailable = new RedisUnavailable(isA(err, NOT_SENT) ? false : 'unknown', err);
  }
  if (unavailable) {
    // Only the client's own events start and end an outage: a timeout alone (a Redis that
    // stalls without closing the connection) gets a 503, not a state nothing would end.
    if (outage) outage.refused += 1;
    if (res.headersSent) return res.destroy();
    res.set('Retry-After', '1');
    return res.status(503).json({ error: 'redis unavailable', applied: unavailable.applied, pid: process.pid });
  }
  log(`error: ${err && err.stack ? err.stack : err}`);
  if (res.headersSent) return res.destroy();
  return res.status(500).json({ error: 'internal error', pid: process.pid });
});

// ---- listen once Redis answered or failed once, then stop cleanly ------------------------------

let server = null;
function listenOnce() {
  if (server) return;
  // listen(port, cb): two arguments, as herd's Node protocol expects from a cluster worker.
  server = app.listen(port, () => {
    listening = true;
    log(`listening on :${server.address().port}`);
    // After Node's own `listening` message to herd (sent by a listener that runs after this
    // one), so herd sees "listening, then unready", not the other way round.
    setImmediate(sayUnready);
  });
  server.on('close', () => {
    // The last connection is gone (herd stopped us, or SIGTERM): let go of Redis so the
    // process can exit on its own.
    redis.quit().catch(() => redis.disconnect().catch(() => {}));
  });
}

process.on('SIGTERM', () => {
  if (server) server.close();
  else redis.disconnect().catch(() => {});
});
