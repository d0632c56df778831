//! Node apps, unmodified, through Node's cluster IPC protocol (`fixtures/app.js`, real node).

mod balance;
mod compat;
mod kill_timeout;
mod lifecycle;
mod listen_host;
mod messages;
mod reuseport;
mod transports;

use crate::util::{fixture, Herd};

/// `herd run -i N -e PORT=0 EXTRA… fixtures/app.js`: every worker's `listen(0)` gets the
/// same port from herd, read from the `bound` event.
pub fn start_node(instances: usize, extra: &[&str]) -> Herd {
    let app = fixture("app.js");
    let n = instances.to_string();
    let mut args = vec!["-i", &n, "-e", "PORT=0"];
    args.extend_from_slice(extra);
    args.push(&app);
    Herd::start(&args)
}
