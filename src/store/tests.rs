//! Tests of the store: layout, locks, durability, hostile trees.
use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};

fn digest(hex: &str) -> Sha256Digest {
    hex.parse().unwrap()
}

fn store(dir: &tempfile::TempDir) -> Store {
    Store::open(dir.path()).unwrap()
}

/// Every file under `dir`, relative, sorted; directories are not listed.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

fn fill_with(bytes: &[u8]) -> impl FnMut(&mut dyn Write) -> Result<u64, FillError> + '_ {
    move |w| {
        w.write_all(bytes)?;
        Ok(bytes.len() as u64)
    }
}

const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

#[test]
fn paths_are_sharded_by_the_first_two_hex_digits() {
    let s = Store {
        cache: PathBuf::from("/cache"),
        root: PathBuf::from("/cache/store-v1"),
        options: StoreOptions::default(),
    };
    let d = digest(ABC);
    assert_eq!(s.blob_path(&d), Path::new("/cache/store-v1/blobs/ba").join(ABC));
    assert_eq!(
        s.entry_lock_path(&d),
        Path::new("/cache/store-v1/locks").join(format!("{ABC}.lock"))
    );
    assert_eq!(s.gc_lock_path(), Path::new("/cache/store-v1/gc.lock"));
    assert_eq!(blob_name("ba", ABC), Some(d));
    assert_eq!(blob_name("bb", ABC), None, "a blob in the wrong shard is not a blob");
    assert_eq!(blob_name("ba", &ABC.to_uppercase()), None);
    assert_eq!(blob_name("ba", &format!("{ABC}.partial")), None);
    assert!(is_shard_name("0f") && !is_shard_name("0F") && !is_shard_name("tmp") && !is_shard_name("g0"));
}

#[test]
fn open_creates_the_versioned_layout() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    assert_eq!(s.root(), dir.path().join("store-v1"));
    for sub in ["blobs", "tmp", "locks"] {
        assert!(s.root().join(sub).is_dir(), "{sub}");
    }
    // Opening again is fine.
    Store::open(dir.path()).unwrap();
}

#[test]
fn default_root_prefers_khub_cache_then_absolute_xdg_then_home() {
    let root = |pairs: &[(&str, &str)]| Store::default_root(&Environment::from_pairs(pairs.iter().copied()));
    let all = [("KHUB_CACHE", "/k"), ("XDG_CACHE_HOME", "/x"), ("HOME", "/h")];
    assert_eq!(root(&all).unwrap(), Path::new("/k"));
    assert_eq!(root(&all[1..]).unwrap(), Path::new("/x/khub"));
    assert_eq!(root(&all[2..]).unwrap(), Path::new("/h/.cache/khub"));
    // Empty means unset; a relative XDG_CACHE_HOME is ignored, as the spec says.
    assert_eq!(
        root(&[("KHUB_CACHE", ""), ("XDG_CACHE_HOME", "rel"), ("HOME", "/h")]).unwrap(),
        Path::new("/h/.cache/khub")
    );
    let e = root(&[("KHUB_CACHE", " ")]).unwrap_err();
    assert!(matches!(e, StoreError::NoCacheDir));
    assert!(e.to_string().contains("set KHUB_CACHE to a writable directory"), "{e}");
}

#[test]
fn lock_timeout_comes_from_the_environment() {
    let opts = |v: &str| StoreOptions::from_env(&Environment::from_pairs([("KHUB_LOCK_TIMEOUT", v)]));
    assert_eq!(
        StoreOptions::from_env(&Environment::empty()).unwrap().lock_timeout,
        DEFAULT_LOCK_TIMEOUT
    );
    assert_eq!(opts("0").unwrap().lock_timeout, Duration::ZERO);
    assert_eq!(opts(" 2.5 ").unwrap().lock_timeout, Duration::from_millis(2500));
    for bad in ["-1", "soon", "inf", "1e12"] {
        let e = opts(bad).unwrap_err().to_string();
        assert!(e.contains("KHUB_LOCK_TIMEOUT") && e.contains(bad) && e.contains("seconds"), "{e}");
    }
}

#[test]
fn inserted_blobs_are_present_read_only_and_readable() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let d = s.insert_bytes("lib/abc.so", b"abc").unwrap();
    assert_eq!(d, digest(ABC));
    assert!(s.contains(&d, 3));
    assert!(!s.contains(&d, 4), "the size is part of presence");
    assert!(!s.contains(&crate::verify::sha256(b"abd"), 3));
    let mut got = String::new();
    s.open_blob(&d).unwrap().read_to_string(&mut got).unwrap();
    assert_eq!(got, "abc");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(s.blob_path(&d)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o444);
    }
    assert_eq!(s.list().unwrap(), vec![(d, 3)]);
    assert!(files_under(&s.tmp_dir()).is_empty());
    assert!(s.verify_blob(&d, 3).unwrap());
}

#[test]
fn missing_blobs_say_to_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let e = s.open_blob(&digest(ABC)).unwrap_err();
    assert!(matches!(e, StoreError::Missing { .. }));
    let e = e.to_string();
    assert!(e.contains(ABC) && e.contains("khub fetch"), "{e}");
}

#[test]
fn bad_bytes_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let d = digest(ABC);
    let nothing_left = |s: &Store| {
        assert!(!s.contains(&d, 3));
        assert!(files_under(&s.root().join("blobs")).is_empty());
        assert!(files_under(&s.tmp_dir()).is_empty());
    };

    // Right size, wrong bytes.
    let e = s.insert_with("lib/x.so", &d, 3, &mut fill_with(b"abd")).unwrap_err();
    assert!(
        matches!(&e, StoreError::DigestMismatch { path, expected, .. } if path == "lib/x.so" && *expected == d),
        "{e:?}"
    );
    assert!(e.to_string().contains("fetch it again"), "{e}");
    nothing_left(&s);

    // Too few bytes.
    let e = s.insert_with("lib/x.so", &d, 3, &mut fill_with(b"ab")).unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::SizeMismatch {
                expected: 3,
                actual: 2,
                ..
            }
        ),
        "{e:?}"
    );
    nothing_left(&s);

    // Too many: refused at the first byte past the announced size.
    let mut calls = 0;
    let e = s
        .insert_with("lib/x.so", &d, 3, &mut |w| {
            calls += 1;
            for _ in 0..1000 {
                w.write_all(b"ab")?;
            }
            Ok(2000)
        })
        .unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::SizeMismatch {
                expected: 3,
                actual: 4,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(calls, 1);
    nothing_left(&s);

    // The callback fails: its message, with sources, is kept.
    let e = s
        .insert_with("lib/x.so", &d, 3, &mut |w| {
            w.write_all(b"a")?;
            Err(Box::new(io::Error::new(io::ErrorKind::ConnectionReset, "connection reset by peer")))
        })
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Fill { message, .. } if message.contains("connection reset")),
        "{e:?}"
    );
    nothing_left(&s);
}

#[cfg(unix)]
#[test]
fn symlinks_in_the_store_are_refused_then_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let d = digest(ABC);
    let outside = dir.path().join("outside");
    std::fs::write(&outside, b"abc").unwrap();

    // A symlink at the blob path, pointing at the right bytes.
    let blob = s.blob_path(&d);
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&outside, &blob).unwrap();
    assert!(!s.contains(&d, 3));
    let e = s.open_blob(&d).unwrap_err();
    assert!(
        matches!(&e, StoreError::NotRegular { path, what: "a symlink" } if *path == blob),
        "{e:?}"
    );
    assert!(s.list().unwrap().is_empty());

    // Inserting replaces the link itself, never writing through it.
    assert_eq!(s.insert_with("x", &d, 3, &mut fill_with(b"abc")).unwrap(), Inserted::Written(3));
    assert!(std::fs::symlink_metadata(&blob).unwrap().is_file());
    assert!(s.contains(&d, 3));
    assert_eq!(std::fs::read(&outside).unwrap(), b"abc");

    // A symlinked shard directory.
    let other = crate::verify::sha256(b"other");
    let shard = s.blob_path(&other).parent().unwrap().to_path_buf();
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::write(elsewhere.join(other.to_string()), b"other").unwrap();
    std::os::unix::fs::symlink(&elsewhere, &shard).unwrap();
    assert!(!s.contains(&other, 5));
    let e = s.open_blob(&other).unwrap_err();
    assert!(matches!(&e, StoreError::NotRegular { path, .. } if *path == shard), "{e:?}");
    assert!(e.to_string().contains("khub gc"), "{e}");
}

#[test]
fn present_blobs_are_not_fetched_again() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let d = s.insert_bytes("x", b"abc").unwrap();
    let mut calls = 0;
    let r = s
        .insert_with("x", &d, 3, &mut |_| {
            calls += 1;
            Ok(0)
        })
        .unwrap();
    assert_eq!((r, calls), (Inserted::Present, 0));
    assert_eq!(s.insert_bytes("x", b"abc").unwrap(), d);
}

#[test]
fn orphaned_temp_files_of_an_entry_are_removed_when_it_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let d = digest(ABC);
    std::fs::write(s.tmp_dir().join(format!("{ABC}.1.deadbeef.partial")), b"ab").unwrap();
    std::fs::write(s.tmp_dir().join("unrelated.partial"), b"").unwrap();
    s.insert_with("x", &d, 3, &mut fill_with(b"abc")).unwrap();
    assert_eq!(files_under(&s.tmp_dir()), ["unrelated.partial"]);
}

#[cfg(unix)]
#[test]
fn damaged_blobs_are_evicted_by_verify() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let d = s.insert_bytes("x", b"abc").unwrap();
    let blob = s.blob_path(&d);
    std::fs::set_permissions(&blob, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&blob, b"abd").unwrap();
    assert!(s.contains(&d, 3), "presence is by size only");
    assert!(!s.verify_blob(&d, 3).unwrap());
    assert!(!blob.exists());
    assert!(!s.verify_blob(&d, 3).unwrap(), "missing");
    assert_eq!(s.insert_bytes("x", b"abc").unwrap(), d);
    assert!(s.verify_blob(&d, 3).unwrap());
}

#[test]
fn gc_removes_what_is_not_kept() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let a = s.insert_bytes("a", b"aaaa").unwrap();
    let b = s.insert_bytes("b", b"bbbbbb").unwrap();
    let c = s.insert_bytes("c", b"c").unwrap();
    std::fs::write(s.tmp_dir().join("dead.1.x.partial"), b"zz").unwrap();
    let keep: BTreeSet<_> = [a].into();

    let before = files_under(s.root());
    let dry = s.gc(&keep, true).unwrap();
    let expected = GcReport {
        removed: 2,
        removed_bytes: 7,
        kept: 1,
        tmp_removed: 1,
        quarantine_removed: 0,
    };
    assert_eq!(dry, expected);
    assert_eq!(files_under(s.root()), before, "a dry run removes nothing");

    assert_eq!(s.gc(&keep, false).unwrap(), expected);
    assert_eq!(s.list().unwrap(), vec![(a, 4)]);
    assert!(!s.contains(&b, 6) && !s.contains(&c, 1));
    for gone in [b, c] {
        let shard = s.blob_path(&gone).parent().unwrap().to_path_buf();
        if shard != s.blob_path(&a).parent().unwrap() {
            assert!(!shard.exists(), "empty shard {} left", shard.display());
        }
    }
    assert!(files_under(&s.tmp_dir()).is_empty());
    assert!(files_under(&s.locks_dir()).is_empty(), "entry lock files are removed");
    // The store still works afterwards.
    assert_eq!(s.insert_bytes("b", b"bbbbbb").unwrap(), b);
    assert_eq!(
        s.gc(&BTreeSet::new(), false).unwrap(),
        GcReport {
            removed: 2,
            removed_bytes: 10,
            kept: 0,
            tmp_removed: 0,
            quarantine_removed: 0,
        }
    );
    assert!(files_under(&s.root().join("blobs")).is_empty());
}

#[test]
fn a_dry_run_beside_writers_counts_only_old_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let fresh = s.tmp_dir().join("fresh.partial");
    let old = s.tmp_dir().join("old.partial");
    std::fs::write(&fresh, b"").unwrap();
    let f = File::create(&old).unwrap();
    f.set_modified(SystemTime::now() - 2 * STALE_TMP_AGE).unwrap();
    drop(f);

    let pin = s.pin().unwrap();
    assert_eq!(s.gc(&BTreeSet::new(), true).unwrap().tmp_removed, 1);
    drop(pin);
    assert_eq!(s.gc(&BTreeSet::new(), true).unwrap().tmp_removed, 2);
    assert!(fresh.exists() && old.exists());
}

#[test]
fn gc_waits_for_pinned_readers_and_gives_up_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open_with(
        dir.path(),
        StoreOptions {
            lock_timeout: Duration::from_millis(60),
        },
    )
    .unwrap();
    let _pin = s.pin().unwrap();
    let e = s.gc(&BTreeSet::new(), false).unwrap_err();
    assert!(matches!(&e, StoreError::LockTimeout { path, waited } if *path == s.gc_lock_path() && *waited >= Duration::from_millis(60)));
    // Writers share the lock with readers.
    s.insert_bytes("x", b"abc").unwrap();
}

#[test]
fn a_held_entry_lock_times_out_naming_the_lock_and_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open_with(
        dir.path(),
        StoreOptions {
            lock_timeout: Duration::from_millis(50),
        },
    )
    .unwrap();
    let d = digest(ABC);
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let holder = {
        let s = s.clone();
        std::thread::spawn(move || {
            let pin = s.pin().unwrap();
            let guard = s.lock_entry(&pin, &d).unwrap();
            held_tx.send(()).unwrap();
            done_rx.recv().unwrap();
            drop(guard);
        })
    };
    held_rx.recv().unwrap();
    let calls = AtomicUsize::new(0);
    let e = s
        .insert_with("x", &d, 3, &mut |w| {
            calls.fetch_add(1, Ordering::SeqCst);
            w.write_all(b"abc")?;
            Ok(3)
        })
        .unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let lock = s.entry_lock_path(&d);
    assert!(matches!(&e, StoreError::LockTimeout { path, .. } if *path == lock), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&lock.display().to_string()) && msg.contains("KHUB_LOCK_TIMEOUT"),
        "{msg}"
    );

    // Released on drop: the next try succeeds.
    done_tx.send(()).unwrap();
    holder.join().unwrap();
    assert_eq!(s.insert_with("x", &d, 3, &mut fill_with(b"abc")).unwrap(), Inserted::Written(3));
}

/// The manifest module's test manifest, with a 3-byte file whose digest is `ABC`'s.
fn manifest() -> String {
    crate::manifest::tests::SMALL
        .replace("size = 1024", "size = 3")
        .replace("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", ABC)
}

#[test]
fn store_source_opens_blobs_and_says_how_to_fetch_missing_ones() {
    let m = crate::manifest::Manifest::from_toml_str(&manifest()).unwrap();
    let variant = &m.variants[0];
    let entry = &variant.files[0];
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let src = StoreSource { store: &s };

    let e = src.open(variant, entry).unwrap_err().to_string();
    for part in ["variants/cuda128/libactivation.so", ABC, "cuda128-x86_64-linux", "khub fetch"] {
        assert!(e.contains(part), "{part} missing from: {e}");
    }

    s.insert_bytes(entry.path.as_str(), b"abc").unwrap();
    let mut got = Vec::new();
    src.open(variant, entry).unwrap().read_to_end(&mut got).unwrap();
    assert_eq!(got, b"abc");
}

/// A blob written in many pieces across several early-writeback chunks (issue 14) is
/// stored whole and exact: the writeback hints change when the disk works, not what it
/// holds.
#[test]
fn a_large_blob_written_in_pieces_across_writeback_chunks_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let len = (2 * WRITEBACK_CHUNK + 12_345) as usize;
    let bytes: Vec<u8> = (0..len).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let d = crate::verify::sha256(&bytes);
    let inserted = s
        .insert_with("big.so", &d, len as u64, &mut |w| {
            for piece in bytes.chunks(100_003) {
                w.write_all(piece)?;
            }
            Ok(len as u64)
        })
        .unwrap();
    assert_eq!(inserted, Inserted::Written(len as u64));
    assert_eq!(std::fs::read(s.blob_path(&d)).unwrap(), bytes);
    assert!(files_under(&s.root().join("tmp")).is_empty(), "no temp file left behind");
}

#[test]
fn early_writeback_counts_what_it_passes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = File::create(dir.path().join("f")).unwrap();
    let mut w = EarlyWriteback::new(&mut f);
    w.write_all(&vec![7u8; WRITEBACK_CHUNK as usize - 1]).unwrap();
    assert_eq!((w.written, w.started), (WRITEBACK_CHUNK - 1, 0), "below one chunk: nothing started");
    w.write_all(&[7u8; 2]).unwrap();
    assert_eq!(
        (w.written, w.started),
        (WRITEBACK_CHUNK + 1, WRITEBACK_CHUNK + 1),
        "a full chunk is started"
    );
    w.flush().unwrap();
    assert_eq!(std::fs::metadata(dir.path().join("f")).unwrap().len(), WRITEBACK_CHUNK + 1);
}

/// `open_blob`'s one-call path (`openat2` beneath the store root) opens an intact blob,
/// and leaves every hostile shape to the path-by-path checks, which name it: a FIFO (the
/// open must not block on it), a directory, a symlinked `blobs` directory.
#[cfg(target_os = "linux")]
#[test]
fn open_blob_opens_in_one_call_and_refuses_fifos_directories_and_symlinked_parents() {
    use std::io::Read as _;
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let d = s.insert_bytes("x", b"abc").unwrap();
    // Where the kernel has no openat2 (before 5.6, or a seccomp filter refusing it), the
    // one-call path answers nothing and only the fallback's answers are checked.
    // SAFETY: openat2 with a NULL `how` and size 0: an argument error where it exists.
    let openat2 = unsafe { libc::syscall(libc::SYS_openat2, libc::AT_FDCWD, c".".as_ptr(), std::ptr::null::<u8>(), 0usize) } >= 0
        || !matches!(io::Error::last_os_error().raw_os_error(), Some(libc::ENOSYS | libc::EPERM));
    let mut bytes = Vec::new();
    if openat2 {
        s.open_blob_beneath(&d)
            .expect("openat2 opens an intact blob")
            .read_to_end(&mut bytes)
            .unwrap();
        assert_eq!(bytes, b"abc");
        bytes.clear();
    } else {
        eprintln!("no openat2 here: only the path-by-path checks are tested");
    }
    s.open_blob(&d).unwrap().read_to_end(&mut bytes).unwrap();
    assert_eq!(bytes, b"abc");

    // A FIFO where a blob should be: refused at once, not waited on.
    let fifo = crate::verify::sha256(b"fifo");
    let path = s.blob_path(&fifo);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    assert!(s.open_blob_beneath(&fifo).is_none());
    let e = s.open_blob(&fifo).unwrap_err();
    assert!(matches!(&e, StoreError::NotRegular { path: p, .. } if *p == path), "{e:?}");

    // A directory where a blob should be.
    let dirblob = crate::verify::sha256(b"dir");
    let path = s.blob_path(&dirblob);
    std::fs::create_dir_all(&path).unwrap();
    assert!(s.open_blob_beneath(&dirblob).is_none());
    assert!(matches!(s.open_blob(&dirblob).unwrap_err(), StoreError::NotRegular { .. }));

    // `blobs` itself a symlink to a copy holding the right bytes: refused by both paths.
    let copy = dir.path().join("copy");
    std::fs::rename(s.blobs_dir(), &copy).unwrap();
    std::os::unix::fs::symlink(&copy, s.blobs_dir()).unwrap();
    assert!(s.open_blob_beneath(&d).is_none());
    let e = s.open_blob(&d).unwrap_err();
    assert!(
        matches!(&e, StoreError::NotRegular { path, what: "a symlink" } if *path == s.blobs_dir()),
        "{e:?}"
    );
}

/// A store directory replaced while a `Store` lives is seen as it is now by `open_blob`, as
/// by every path-based operation: no descriptor of the old directory is kept.
#[test]
fn open_blob_follows_a_replaced_store_directory() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let d = s.insert_bytes("x", b"abc").unwrap();
    assert!(s.open_blob(&d).is_ok());
    std::fs::rename(s.root(), dir.path().join("moved-away")).unwrap();
    let again = Store::open(dir.path()).unwrap();
    assert_eq!(again.root(), s.root());
    let e = s.open_blob(&d).unwrap_err();
    assert!(matches!(e, StoreError::Missing { .. }), "{e:?}");
    let d2 = again.insert_bytes("y", b"abd").unwrap();
    assert!(s.open_blob(&d2).is_ok());
}

fn known(commit: &str) -> KnownRelease {
    KnownRelease {
        commit: commit.to_owned(),
        manifest_sha256: digest(ABC),
        signature_sha256: None,
        accepted_at: None,
    }
}

/// Releases of one repository recorded by many writers at once are all kept: each
/// read-modify-write of the index file holds that file's lock (without it, writers wrote
/// back what they had read and releases were lost).
#[test]
fn concurrent_index_updates_lose_no_release() {
    let dir = tempfile::tempdir().unwrap();
    let repo: crate::ids::RepoId = "acme/k".parse().unwrap();
    let registry = "http://127.0.0.1:1";
    std::thread::scope(|s| {
        for t in 0..8 {
            let (dir, repo) = (&dir, &repo);
            s.spawn(move || {
                // A `Store` per thread, as separate processes would have.
                let st = store(dir);
                for i in 0..10 {
                    let v = semver::Version::new(1, t, i);
                    st.record_release(registry, repo, &v, known(&format!("c{t}{i}"))).unwrap();
                }
            });
        }
    });
    let got = store(&dir).known_releases(registry, &repo);
    assert_eq!(got.releases.len(), 80, "{:?}", got.releases.keys().collect::<Vec<_>>());
}

/// An index file that is a FIFO, a symlink or far too large reads as absent, at once: a
/// FIFO used to block every load and fetch of the repository for ever, a symlink was
/// followed anywhere, and any size was read into memory.
#[test]
fn hostile_index_files_read_as_absent() {
    let dir = tempfile::tempdir().unwrap();
    let st = store(&dir);
    let repo: crate::ids::RepoId = "acme/k".parse().unwrap();
    let registry = "http://127.0.0.1:1";
    let path = st.index_path(registry, &repo);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let valid = serde_json::to_vec(&KnownReleases {
        registry: Some(registry.into()),
        releases: [("1.0.0".to_owned(), known("c"))].into(),
    })
    .unwrap();

    // A FIFO: the read must return, not wait for a writer.
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let (tx, rx) = std::sync::mpsc::channel();
    let (root, repo2) = (dir.path().to_owned(), repo.clone());
    std::thread::spawn(move || {
        let _ = tx.send(Store::open(&root).unwrap().known_releases(registry, &repo2));
    });
    let got = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("reading an index file that is a FIFO blocked");
    assert!(got.releases.is_empty());
    assert!(st.index_entries().is_empty());
    std::fs::remove_file(&path).unwrap();

    // A symlink to a valid index file elsewhere.
    let elsewhere = dir.path().join("elsewhere.json");
    std::fs::write(&elsewhere, &valid).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
    assert!(st.known_releases(registry, &repo).releases.is_empty());
    assert!(st.index_entries().is_empty());
    std::fs::remove_file(&path).unwrap();

    // Valid JSON, but larger than any index khub writes.
    let mut big = valid.clone();
    big.pop();
    big.extend(std::iter::repeat_n(b' ', 17 << 20));
    big.push(b'}');
    assert!(serde_json::from_slice::<KnownReleases>(&big).is_ok());
    std::fs::write(&path, &big).unwrap();
    assert!(st.known_releases(registry, &repo).releases.is_empty());

    // The same bytes at their size are read.
    std::fs::write(&path, &valid).unwrap();
    assert_eq!(st.known_releases(registry, &repo).releases.len(), 1);
    assert_eq!(st.index_entries().len(), 1);
}

/// A directory planted at a blob's name, or at a quarantine name, blocked that digest for
/// good (nothing can be renamed onto a directory, and gc left directories alone, though
/// the error said to run gc). gc now removes them, and the blob can be stored again.
#[test]
fn gc_removes_directories_planted_at_blob_and_quarantine_names() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let d = digest(ABC);
    let blob = s.blob_path(&d);
    std::fs::create_dir_all(blob.join("inner")).unwrap();
    std::fs::write(blob.join("inner/file"), b"x").unwrap();
    let qdir = s.quarantine_dir().join(ABC);
    std::fs::create_dir_all(&qdir).unwrap();
    assert!(s.insert_bytes("abc", b"abc").is_err(), "a directory at the name blocks the insert");

    let report = s.gc(&[d].into(), false).unwrap();
    assert_eq!((report.removed, report.quarantine_removed), (1, 1), "{report:?}");
    assert!(!blob.exists() && !qdir.exists());
    assert_eq!(s.insert_bytes("abc", b"abc").unwrap(), d);
    assert!(s.verify_blob(&d, 3).unwrap());
}

/// gc lists and removes through the directory it opened: a `tmp/` swapped for a symlink
/// after that (a race whoever can write the cache could run) does not make it remove
/// same-named files wherever the symlink points.
#[test]
fn gc_removes_through_the_directory_it_opened() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let tmp = s.tmp_dir();
    std::fs::write(tmp.join("victim.txt"), b"planted").unwrap();
    let opened = GcDir::open(&tmp).unwrap().unwrap();
    let entries = opened.entries().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].path, tmp.join("victim.txt"), "messages name the real path");

    // Swap: the real tmp/ moves away, a symlink to an outside directory holding a file of
    // the same name takes its place.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("victim.txt"), b"precious").unwrap();
    let moved = dir.path().join("tmp-moved");
    std::fs::rename(&tmp, &moved).unwrap();
    std::os::unix::fs::symlink(outside.path(), &tmp).unwrap();

    opened.remove(&entries[0], false).unwrap();
    assert_eq!(std::fs::read(outside.path().join("victim.txt")).unwrap(), b"precious");
    assert!(!moved.join("victim.txt").exists(), "the file in the opened directory went");

    // Opening refuses the symlink itself.
    assert!(matches!(GcDir::open(&tmp), Err(StoreError::NotRegular { .. })));
    assert!(matches!(s.gc(&BTreeSet::new(), false), Err(StoreError::NotRegular { .. })));
    assert_eq!(std::fs::read(outside.path().join("victim.txt")).unwrap(), b"precious");
}
