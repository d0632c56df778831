//! `herd run` with socket-activation workers (`fixtures/inherit.py` and friends).

mod addresses;
mod compat;
mod inherit;
mod lifecycle;
mod output;
mod pipes;
mod serving;

use crate::util::{fixture, Herd};

/// `herd run -i N --listen 127.0.0.1:0 EXTRA… fixtures/inherit.py`.
pub fn start_inherit(instances: usize, extra: &[&str]) -> Herd {
    start_inherit_on("127.0.0.1:0", instances, extra)
}

/// `herd run -i N --listen LISTEN --ready notify EXTRA… fixtures/inherit.py`. The fixture
/// sends `READY=1` once its SIGTERM handler is in place, so *ready* means really serving
/// (the default, "READY=1 or 1 s up", can call a slow-starting interpreter ready too early).
pub fn start_inherit_on(listen: &str, instances: usize, extra: &[&str]) -> Herd {
    let app = fixture("inherit.py");
    let n = instances.to_string();
    let mut args = vec!["-i", &n, "--listen", listen, "--ready", "notify"];
    args.extend_from_slice(extra);
    args.push(&app);
    Herd::start(&args)
}
