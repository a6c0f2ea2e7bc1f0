//! Per-backend data folders under the configured mount base.
//!
//! A mount path is relative and may not leave the base, neither by `..` nor
//! through a symlink: the folder is created, then resolved, then checked to be
//! inside the resolved base before it is handed to Docker.

use crate::model::{validate_mount_path, SpecError};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(transparent)]
    Invalid(#[from] SpecError),
    #[error("mount base {base}: {source}")]
    Base {
        base: PathBuf,
        source: std::io::Error,
    },
    #[error("executable.mount: cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("executable.mount: {path} resolves outside the mount base")]
    Escapes { path: PathBuf },
}

/// Checks, without touching the filesystem, that `relative` is acceptable.
pub fn check(relative: &Path) -> Result<(), MountError> {
    Ok(validate_mount_path(relative)?)
}

/// Checks that `relative` stays under `base` once resolved, creating nothing:
/// the deepest part of the path that exists must resolve inside the base.
pub fn verify(base: &Path, relative: &Path) -> Result<(), MountError> {
    check(relative)?;
    let Ok(resolved_base) = base.canonicalize() else {
        // The base does not exist yet, so nothing under it can be a symlink.
        return Ok(());
    };
    let mut existing = base.join(relative);
    while !existing.exists() {
        if !existing.pop() {
            break;
        }
    }
    let resolved = existing.canonicalize().map_err(|source| MountError::Create {
        path: existing.clone(),
        source,
    })?;
    if resolved.starts_with(&resolved_base) {
        Ok(())
    } else {
        Err(MountError::Escapes {
            path: relative.to_path_buf(),
        })
    }
}

/// Creates the folder for `relative` under `base` and returns its resolved
/// path, refusing any path that resolves outside `base`.
pub fn prepare(base: &Path, relative: &Path) -> Result<PathBuf, MountError> {
    std::fs::create_dir_all(base).map_err(|source| MountError::Base {
        base: base.to_path_buf(),
        source,
    })?;
    verify(base, relative)?;
    let wanted = base.join(relative);
    std::fs::create_dir_all(&wanted).map_err(|source| MountError::Create {
        path: wanted.clone(),
        source,
    })?;
    let resolved = wanted.canonicalize().map_err(|source| MountError::Create {
        path: wanted.clone(),
        source,
    })?;
    let resolved_base = base.canonicalize().map_err(|source| MountError::Base {
        base: base.to_path_buf(),
        source,
    })?;
    if !resolved.starts_with(&resolved_base) {
        return Err(MountError::Escapes {
            path: relative.to_path_buf(),
        });
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_is_created_under_base() {
        let dir = tempfile::tempdir().unwrap();
        let path = prepare(dir.path(), Path::new("a/b")).unwrap();
        assert!(path.is_dir());
        assert!(path.starts_with(dir.path().canonicalize().unwrap()));
    }

    #[test]
    fn symlink_escape_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        let err = prepare(dir.path(), Path::new("link/x")).unwrap_err();
        assert!(matches!(err, MountError::Escapes { .. }), "{err}");
        assert!(!outside.path().join("x").exists());
        assert!(prepare(dir.path(), Path::new("../x")).is_err());
        assert!(prepare(dir.path(), Path::new("/etc")).is_err());
    }
}
