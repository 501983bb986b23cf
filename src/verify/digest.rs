//! Digests: SHA-256 of byte slices, readers and writers. The one hashing writer,
//! [`HashingWriter`], counts, hashes and forwards bytes up to a limit: the store streams
//! downloads through it into temp files, `publish` reads uploads back through it.
//!
//! This module opens nothing itself; callers hand it bytes.

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

use crate::manifest::Sha256Digest;

/// The SHA-256 of a byte slice.
pub fn sha256(bytes: &[u8]) -> Sha256Digest {
    Sha256Digest(Sha256::digest(bytes).into())
}

/// Hashes everything `r` yields, returning the digest and the byte count.
pub fn sha256_reader(mut r: impl Read) -> std::io::Result<(Sha256Digest, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                h.update(&buf[..k]);
                n += k as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((Sha256Digest(h.finalize().into()), n))
}

/// Counts, hashes and forwards what is written to it, refusing bytes past `limit`.
///
/// A caller that streams from a callback (which may swallow or rewrap errors) reads back
/// what went wrong from [`HashingWriter::overflow`] and [`HashingWriter::write_error`].
pub struct HashingWriter<W: Write> {
    out: W,
    hasher: Sha256,
    written: u64,
    limit: u64,
    overflow: Option<u64>,
    write_error: Option<(io::ErrorKind, String)>,
}

impl<W: Write> HashingWriter<W> {
    /// Forwards to `out`, accepting at most `limit` bytes.
    pub fn new(out: W, limit: u64) -> Self {
        HashingWriter {
            out,
            hasher: Sha256::new(),
            written: 0,
            limit,
            overflow: None,
            write_error: None,
        }
    }

    /// The bytes accepted so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The largest count a write tried to reach past the limit, if one did.
    pub fn overflow(&self) -> Option<u64> {
        self.overflow
    }

    /// The first error the inner writer returned (other than `Interrupted`), if any.
    pub fn take_write_error(&mut self) -> Option<io::Error> {
        self.write_error.take().map(|(kind, message)| io::Error::new(kind, message))
    }

    /// The digest of the bytes accepted, the inner writer (not flushed) and the count.
    pub fn finish(self) -> (Sha256Digest, W, u64) {
        (Sha256Digest(self.hasher.finalize().into()), self.out, self.written)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let attempted = self.written.saturating_add(buf.len() as u64);
        if attempted > self.limit {
            self.overflow = Some(self.overflow.map_or(attempted, |o| o.max(attempted)));
            return Err(io::Error::other(format!("more than the {} bytes announced", self.limit)));
        }
        match self.out.write(buf) {
            Ok(n) => {
                self.hasher.update(&buf[..n]);
                self.written += n as u64;
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.write_error = Some((e.kind(), e.to_string()));
                }
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush().inspect_err(|e| self.write_error = Some((e.kind(), e.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests() {
        assert_eq!(
            sha256(b"").to_string(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let (d, n) = sha256_reader(&b"abc"[..]).unwrap();
        assert_eq!(d.to_string(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(n, 3);
    }

    #[test]
    fn hashing_writer_counts_hashes_and_stops_at_the_limit() {
        let mut w = HashingWriter::new(Vec::new(), 3);
        w.write_all(b"ab").unwrap();
        assert!(w.write_all(b"cd").is_err());
        assert_eq!(w.overflow(), Some(4));
        w.write_all(b"c").unwrap();
        let (d, out, n) = w.finish();
        assert_eq!((out.as_slice(), n), (&b"abc"[..], 3));
        assert_eq!(d, sha256(b"abc"));
    }
}
