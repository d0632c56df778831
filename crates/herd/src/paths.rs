//! Where herd keeps its runtime files: `HERD_HOME`, else `$XDG_RUNTIME_DIR/herd`, else
//! `~/.herd`. The directory is private (0700, owned by the user): the control and notify
//! sockets in it must be reachable by their owner only.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub fn herd_home() -> Result<PathBuf, String> {
    if let Some(home) = std::env::var_os("HERD_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        return Ok(Path::new(&xdg).join("herd"));
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => Ok(Path::new(&home).join(".herd")),
        None => Err("cannot find a home for herd's runtime files: set HERD_HOME".into()),
    }
}

/// Creates `dir` (and parents) if needed and makes sure it is private to this user.
pub fn private_dir(dir: &Path) -> Result<(), String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if meta.uid() != rustix::process::geteuid().as_raw() {
        return Err(format!(
            "{} belongs to another user (uid {}); set HERD_HOME to a directory of your own",
            dir.display(),
            meta.uid()
        ));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot make {} private: {e}", dir.display()))?;
    }
    Ok(())
}
