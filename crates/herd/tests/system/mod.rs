//! herd as a system service: socket activation into herd, PID 1 and orphan reaping,
//! `-i max` under an affinity mask or CPU quota, `--group` and supplementary groups, and
//! `herd startup systemd`.

mod activation;
mod cpus;
mod groups;
mod reaper;
mod startup;
