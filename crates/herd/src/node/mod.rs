//! Node.js apps as cluster workers (specs/node-cluster-protocol.md): the IPC channel and the
//! servers that workers' `listen()` calls ask herd for.

pub mod channel;
pub mod servers;
pub mod sockfile;
