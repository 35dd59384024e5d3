//! Helpers for the end-to-end tests in `tests/tests/`: locating the workspace, its shared data
//! and the binaries cargo built.

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the workspace").to_owned()
}

/// `../shared/data` beside the repository (DESIGN.md): data every test may use.
pub fn shared_data() -> PathBuf {
    workspace_root().join("../shared/data")
}
