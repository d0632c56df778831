//! Health: hang detection (`--watchdog`), HTTP probes (`--health-check`), the recycling
//! limits (`--max-memory`, `--max-requests`, `--max-age`) and readiness (`--ready`), against the
//! real binary with real Node and Python workers. Fixtures: `fixtures/health_app.js` (Node)
//! and `fixtures/health_server.py` (socket activation).

mod hang;
mod limits;
mod probes;
mod readiness;
mod support;
mod timing;
