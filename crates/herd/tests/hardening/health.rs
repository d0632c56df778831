//! Hardening: see the module list in mod.rs.
