//! Verified bytes in a place nobody else can change.
//!
//! Verification happens before `dlopen`, because a library's constructors run inside
//! `dlopen`. On Linux the bytes are copied into a memfd, the memfd is sealed against any
//! further change, the *sealed* bytes are hashed, and that memfd is what `dlopen` opens
//! (through `/proc/self/fd/N`). A file swapped on disk after the check changes nothing.
//! Elsewhere a private read-only copy is verified and loaded.

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;

use super::{FileSource, VerifyError};
use crate::manifest::{FileEntry, Variant};

/// A file whose bytes were verified in a place nobody else can change.
pub struct Verified {
    /// Linux: the sealed memfd. Elsewhere: the private read-only copy.
    file: File,
    #[cfg(not(target_os = "linux"))]
    _dir: tempfile::TempDir,
    #[cfg(not(target_os = "linux"))]
    path: PathBuf,
}

impl Verified {
    /// Leaks the descriptor, so it stays open (and its number reserved) for the life of
    /// the process.
    pub fn keep_open(self) {
        #[cfg(unix)]
        {
            use std::os::fd::IntoRawFd;
            let _ = self.file.into_raw_fd();
        }
        #[cfg(not(unix))]
        std::mem::forget(self);
    }

    /// Makes sure no library is already loaded under [`Verified::load_path`]'s name, moving
    /// the memfd to another descriptor number while one is. glibc finds loaded objects by
    /// name before it opens anything: when another part of the process loaded a library
    /// from `/proc/self/fd/N` and then closed N, a memfd that got N back would make
    /// `dlopen` return that library, not the verified bytes. Elsewhere: nothing to do.
    pub fn claim_unused_name(&mut self) -> std::io::Result<()> {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::{AsRawFd, FromRawFd};
            use std::os::unix::ffi::OsStrExt;
            for _ in 0..64 {
                let path = std::ffi::CString::new(self.load_path().as_os_str().as_bytes()).map_err(std::io::Error::other)?;
                // SAFETY: a NUL-terminated path; RTLD_NOLOAD loads nothing and runs no code,
                // it only returns a handle (with a reference taken) if the name is loaded.
                let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOLOAD | libc::RTLD_LAZY) };
                if handle.is_null() {
                    return Ok(());
                }
                // SAFETY: `handle` came from dlopen just above; this drops its reference.
                unsafe { libc::dlclose(handle) };
                // SAFETY: F_DUPFD_CLOEXEC duplicates our open descriptor onto the lowest
                // free number above it; the new descriptor is owned by the new File.
                let fd = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, self.file.as_raw_fd() + 1) };
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: `fd` is fresh and owned by nothing else. The old File closes its
                // number when replaced.
                self.file = unsafe { File::from_raw_fd(fd) };
            }
            Err(std::io::Error::other(
                "every descriptor number tried names a library already loaded",
            ))
        }
        #[cfg(not(target_os = "linux"))]
        Ok(())
    }

    /// The path `dlopen` should open.
    pub fn load_path(&self) -> PathBuf {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
        }
        #[cfg(not(target_os = "linux"))]
        {
            self.path.clone()
        }
    }
}

/// Copies at most `entry.size + 1` bytes of the release file into private storage, makes
/// it immutable, and hashes what is there.
pub fn open_verified(source: &dyn FileSource, variant: &Variant, entry: &FileEntry) -> Result<Verified, VerifyError> {
    let src = source.open(variant, entry)?;
    let io = |what: &'static str| {
        let path = entry.path.to_string();
        move |source| VerifyError::Io { what, path, source }
    };
    let (mut file, verified) = private_file(entry).map_err(io("cannot create private storage for"))?;
    let copied = std::io::copy(&mut src.take(entry.size + 1), &mut file).map_err(io("cannot read"))?;
    if copied != entry.size {
        return Err(VerifyError::SizeMismatch {
            path: entry.path.clone(),
            expected: entry.size,
            actual: copied,
        });
    }
    seal(&file).map_err(io("cannot seal"))?;
    // Hash the sealed bytes: exactly what dlopen will map. One pass over them, in place
    // (a read-only mapping of the memfd), rather than reading them back into a buffer.
    let (actual, n) = hash_sealed(&file, copied).map_err(io("cannot hash"))?;
    if n != entry.size {
        return Err(VerifyError::SizeMismatch {
            path: entry.path.clone(),
            expected: entry.size,
            actual: n,
        });
    }
    if actual != entry.sha256 {
        return Err(VerifyError::DigestMismatch {
            path: entry.path.clone(),
            expected: entry.sha256,
            actual,
        });
    }
    Ok(verified(file))
}

#[cfg(target_os = "linux")]
fn private_file(entry: &FileEntry) -> std::io::Result<(File, impl FnOnce(File) -> Verified)> {
    use std::os::fd::FromRawFd;
    let name = std::ffi::CString::new(format!("khub:{}", entry.path.components().last().unwrap_or("lib"))).unwrap_or_default();
    // SAFETY: a valid NUL-terminated name and flags; the returned fd is owned by the File.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    Ok((file, |file| Verified { file }))
}

/// SHA-256 of the `len` bytes of the sealed memfd `file`, through a read-only shared
/// mapping of it: the bytes hashed are the memfd's own pages, which the seals keep from
/// changing, and they are not copied again. Returns the digest and the file's size as
/// `fstat` sees it after sealing (the caller compares it with the manifest's).
#[cfg(target_os = "linux")]
fn hash_sealed(file: &File, len: u64) -> std::io::Result<(crate::manifest::Sha256Digest, u64)> {
    use std::os::fd::AsRawFd;
    // The size is sealed too (F_SEAL_SHRINK | F_SEAL_GROW): what fstat says now holds for
    // as long as the memfd exists.
    let size = file.metadata()?.len();
    if size != len || size == 0 {
        // A size other than what was copied cannot happen to a sealed memfd; the caller
        // reports it as a size mismatch, so nothing is hashed.
        return Ok((super::sha256(&[]), 0));
    }
    let n = usize::try_from(size).map_err(|_| std::io::Error::from(std::io::ErrorKind::FileTooLarge))?;
    // SAFETY: a fresh read-only shared mapping of `n` bytes of a descriptor we own, at an
    // address the kernel picks; the result is checked against MAP_FAILED before use.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            n,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `ptr` maps `n` readable bytes (the whole file: its size is sealed, so no
    // access can fault with SIGBUS) and stays mapped until the munmap below; the memfd is
    // sealed against writes, so the bytes cannot change while the slice lives.
    let bytes = unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), n) };
    let digest = super::sha256(bytes);
    // SAFETY: unmaps exactly the mapping made above; `bytes` is not used after this.
    unsafe { libc::munmap(ptr, n) };
    Ok((digest, size))
}

/// SHA-256 of the private copy `file` (elsewhere than Linux), read back from its start.
#[cfg(not(target_os = "linux"))]
fn hash_sealed(file: &File, _len: u64) -> std::io::Result<(crate::manifest::Sha256Digest, u64)> {
    let mut reader = file.try_clone()?;
    std::io::Seek::rewind(&mut reader)?;
    super::sha256_reader(&mut reader)
}

#[cfg(target_os = "linux")]
fn seal(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own, with an integer argument.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn private_file(entry: &FileEntry) -> std::io::Result<(File, impl FnOnce(File) -> Verified)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(entry.path.components().last().unwrap_or("lib"));
    let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
    Ok((file, move |file| Verified { file, _dir: dir, path }))
}

#[cfg(not(target_os = "linux"))]
fn seal(file: &File) -> std::io::Result<()> {
    let mut p = file.metadata()?.permissions();
    p.set_readonly(true);
    file.set_permissions(p)
}
