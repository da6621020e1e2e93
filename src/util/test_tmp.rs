//! Test-only helper: a uniquely named temporary directory, removed on drop.

use std::path::PathBuf;

/// A temporary directory `tartan-<tag>-<pid>-<random>`, removed with its contents on drop.
pub struct TmpDir(pub PathBuf);

impl TmpDir {
    /// Creates the directory.
    pub fn new(tag: &str) -> TmpDir {
        let p = std::env::temp_dir().join(format!(
            "tartan-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&p).expect("creating a temporary directory");
        TmpDir(p)
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
