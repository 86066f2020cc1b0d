//! Small real filesystems for the relays' store and image cache: a tmpfs each, so that "the disk is
//! full" is the kernel's ENOSPC, not a simulated quota. Filling one writes a filler file until the
//! kernel refuses more; freeing it deletes the filler.

use crate::cleanup::{self, Undo};
use anyhow::{Context, Result, bail};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Tmpfs {
    pub path: PathBuf,
    filler: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, size_mb: u64) -> Result<Tmpfs> {
        std::fs::create_dir_all(path)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size_mb}m,mode=0755"))
            .arg("ucrelay-chaos")
            .arg(path)
            .output()
            .context("cannot run mount")?;
        if !out.status.success() {
            bail!(
                "cannot mount a tmpfs on {}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        cleanup::push(Undo::Umount(path.to_path_buf()));
        Ok(Tmpfs {
            path: path.to_path_buf(),
            filler: path.join(".chaos-filler"),
        })
    }

    pub fn free_bytes(&self) -> u64 {
        nix::sys::statvfs::statvfs(&self.path)
            .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
            .unwrap_or(0)
    }

    /// Fills the filesystem until at most `leave` bytes are free (0: until the kernel says ENOSPC).
    /// Returns the bytes written.
    pub fn fill(&self, leave: u64) -> Result<u64> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.filler)
            .with_context(|| format!("cannot open {}", self.filler.display()))?;
        let big = vec![0xa5u8; 1 << 20];
        let mut written = 0u64;
        let mut chunk = big.len();
        loop {
            let free = self.free_bytes();
            if leave > 0 && free <= leave {
                break;
            }
            let want = if leave > 0 {
                chunk.min((free - leave) as usize)
            } else {
                chunk
            };
            if want == 0 {
                break;
            }
            match f.write(&big[..want]) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => {
                    if chunk <= 4096 {
                        break;
                    }
                    chunk /= 4;
                }
                Err(e) => return Err(e).context("filling the tmpfs"),
            }
        }
        Ok(written)
    }

    /// Gives the space back.
    pub fn release(&self) {
        let _ = std::fs::remove_file(&self.filler);
    }

    pub fn unmount(&self) {
        let u = Undo::Umount(self.path.clone());
        cleanup::undo(&u);
        cleanup::forget(&u);
    }
}
