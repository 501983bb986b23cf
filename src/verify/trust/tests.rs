//! Unit tests of the trust policy and the rollback state.
use super::*;
use crate::verify::sign::{SecretKey, keygen};

fn repo(s: &str) -> RepoId {
    s.parse().unwrap()
}

fn v(s: &str) -> semver::Version {
    semver::Version::parse(s).unwrap()
}

fn key() -> (PublicKey, SecretKey) {
    let (pk, sk) = keygen(None).unwrap();
    (pk.parse().unwrap(), SecretKey::parse(&sk, None).unwrap())
}

const NOW: u64 = 1_750_000_000;
const MANIFEST: &[u8] = b"[kernel]\nname = \"activation\"\nversion = \"1.2.3\"\n";

fn signed(sk: &SecretKey, r: &str, ver: &str, expires: Option<u64>) -> String {
    let claim = ReleaseClaim {
        repo: repo(r),
        version: v(ver),
        timestamp: NOW - 100,
        expires,
    };
    sign::sign(sk, MANIFEST, &claim).unwrap()
}

#[test]
fn patterns_parse_and_match() {
    let a = repo("acme/activation");
    assert!("*".parse::<RepoPattern>().unwrap().matches(&a));
    assert!("acme/*".parse::<RepoPattern>().unwrap().matches(&a));
    assert!(!"acme2/*".parse::<RepoPattern>().unwrap().matches(&a));
    assert!(!"Acme/*".parse::<RepoPattern>().unwrap().matches(&a));
    assert!("acme/activation".parse::<RepoPattern>().unwrap().matches(&a));
    assert!(!"acme/activations".parse::<RepoPattern>().unwrap().matches(&a));
    for bad in [
        "", "acme", "*/*", "*/x", "acme/a*", "acme/", "/x", "a/b/c", "acme/**", " acme/x", "..//x",
    ] {
        assert!(bad.parse::<RepoPattern>().is_err(), "{bad}");
    }
    for good in ["*", "acme/*", "acme/activation"] {
        assert_eq!(good.parse::<RepoPattern>().unwrap().to_string(), good);
    }
}

#[test]
fn permissive_accepts_unsigned_and_unchecked_signatures() {
    let p = TrustPolicy::permissive();
    assert_eq!(p, TrustPolicy::default());
    let r = repo("acme/activation");
    assert_eq!(p.check(&r, &v("1.2.3"), MANIFEST, None, NOW).unwrap(), TrustDecision::Unsigned);
    // A signature no configured key can check counts for nothing.
    let (_, sk) = key();
    let sig = signed(&sk, "acme/activation", "1.2.3", None);
    assert_eq!(
        p.check(&r, &v("1.2.3"), MANIFEST, Some(sig.as_bytes()), NOW).unwrap(),
        TrustDecision::Unsigned
    );
}

#[test]
fn signed_by_trusted_key_is_accepted() {
    let (pk, sk) = key();
    let p = TrustPolicy::permissive().require_signature(true).trust_key("acme/*", pk.clone());
    let sig = signed(&sk, "acme/activation", "1.2.3", Some(NOW + 10));
    let d = p
        .check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, Some(sig.as_bytes()), NOW)
        .unwrap();
    let TrustDecision::Signed { key_id, claim } = d else {
        panic!("{d:?}")
    };
    assert_eq!(key_id, pk.key_id());
    assert_eq!(claim.version, v("1.2.3"));
    // Expiry is inclusive: valid at exactly `expires`.
    p.check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, Some(sig.as_bytes()), NOW + 10)
        .unwrap();
}

#[test]
fn untrusted_key_is_refused_and_named() {
    let (trusted, _) = key();
    let (_, other) = key();
    let p = TrustPolicy::permissive().trust_key("acme/*", trusted.clone());
    let sig = signed(&other, "acme/activation", "1.2.3", None);
    let e = p
        .check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, Some(sig.as_bytes()), NOW)
        .unwrap_err();
    let TrustError::UntrustedKey { key_id, trusted: list, .. } = &e else {
        panic!("{e}")
    };
    assert_eq!(key_id, &other.key_id());
    assert_eq!(list, &vec![trusted.key_id()]);
    let msg = e.to_string();
    assert!(
        msg.contains(&other.key_id()) && msg.contains(&trusted.key_id()) && msg.contains("[[publisher]]"),
        "{msg}"
    );
}

#[test]
fn keys_apply_only_to_their_patterns() {
    let (acme, acme_sk) = key();
    let (other, _) = key();
    let p = TrustPolicy::permissive()
        .require_signature(true)
        .trust_key("acme/*", acme.clone())
        .trust_key("kernels-community/activation", other.clone())
        .trust_key("acme/activation", acme.clone());
    assert_eq!(p.keys_for(&repo("acme/activation")), vec![&acme]);
    assert_eq!(p.keys_for(&repo("kernels-community/activation")), vec![&other]);
    assert!(p.keys_for(&repo("kernels-community/norm")).is_empty());
    // acme's key signing a kernels-community release: not trusted there.
    let sig = signed(&acme_sk, "kernels-community/activation", "1.2.3", None);
    let e = p
        .check(
            &repo("kernels-community/activation"),
            &v("1.2.3"),
            MANIFEST,
            Some(sig.as_bytes()),
            NOW,
        )
        .unwrap_err();
    assert!(matches!(e, TrustError::UntrustedKey { .. }), "{e}");
}

#[test]
fn changed_manifest_is_a_bad_signature() {
    let (pk, sk) = key();
    let p = TrustPolicy::permissive().trust_key("*", pk);
    let sig = signed(&sk, "acme/activation", "1.2.3", None);
    let mut m = MANIFEST.to_vec();
    m[3] ^= 0x20;
    let e = p
        .check(&repo("acme/activation"), &v("1.2.3"), &m, Some(sig.as_bytes()), NOW)
        .unwrap_err();
    assert!(matches!(e, TrustError::BadSignature { .. }), "{e}");
    assert!(e.to_string().contains("changed after signing"), "{e}");
    let e = p
        .check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, Some(b"garbage"), NOW)
        .unwrap_err();
    assert!(matches!(e, TrustError::BadSignature { .. }), "{e}");
}

#[test]
fn replayed_signatures_are_refused() {
    let (pk, sk) = key();
    let p = TrustPolicy::permissive().trust_key("acme/*", pk);
    // A genuine signature of 1.2.2 presented for 1.2.3 (same bytes, say a re-tag).
    let sig = signed(&sk, "acme/activation", "1.2.2", None);
    let e = p
        .check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, Some(sig.as_bytes()), NOW)
        .unwrap_err();
    assert!(matches!(e, TrustError::WrongRelease { .. }), "{e}");
    assert!(e.to_string().contains("replay"), "{e}");
    // A genuine signature of another repository by the same publisher.
    let sig = signed(&sk, "acme/norm", "1.2.3", None);
    let e = p
        .check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, Some(sig.as_bytes()), NOW)
        .unwrap_err();
    assert!(matches!(e, TrustError::WrongRelease { .. }), "{e}");
}

#[test]
fn expired_signatures_are_refused() {
    let (pk, sk) = key();
    let p = TrustPolicy::permissive().trust_key("acme/*", pk);
    let sig = signed(&sk, "acme/activation", "1.2.3", Some(NOW - 1));
    let e = p
        .check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, Some(sig.as_bytes()), NOW)
        .unwrap_err();
    let TrustError::Expired { expired_at, .. } = e else { panic!("{e}") };
    assert_eq!(expired_at, NOW - 1);
    assert!(e.to_string().contains("re-sign"), "{e}");
}

#[test]
fn non_claim_trusted_comment_is_refused() {
    // A valid minisign signature whose trusted comment is minisign's default, made with
    // the crate directly since khub's `sign` always writes a claim.
    let pair = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let pk: PublicKey = pair.pk.to_base64().parse().unwrap();
    let p = TrustPolicy::permissive().trust_key("acme/*", pk);
    let sig = minisign::sign(Some(&pair.pk), &pair.sk, MANIFEST, Some("timestamp:1\tfile:khub.toml"), None)
        .unwrap()
        .into_string();
    let e = p
        .check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, Some(sig.as_bytes()), NOW)
        .unwrap_err();
    assert!(matches!(e, TrustError::MalformedClaim { .. }), "{e}");
    assert!(e.to_string().contains("khub sign"), "{e}");
}

#[test]
fn strict_mode_refuses_unsigned() {
    let p = TrustPolicy::permissive().require_signature(true).allow_unsigned("dev/*");
    let e = p.check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, None, NOW).unwrap_err();
    assert!(matches!(e, TrustError::Unsigned { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("khub sign") && msg.contains("allow-unsigned"), "{msg}");
    assert_eq!(
        p.check(&repo("dev/scratch"), &v("0.1.0"), MANIFEST, None, NOW).unwrap(),
        TrustDecision::Unsigned
    );
    // Signed, but no key for the repo: cannot be checked, so refused in strict mode.
    let (_, sk) = key();
    let sig = signed(&sk, "acme/activation", "1.2.3", None);
    let e = p
        .check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, Some(sig.as_bytes()), NOW)
        .unwrap_err();
    assert!(
        matches!(e, TrustError::NoTrustedKey { .. }) && e.to_string().contains("[[publisher]]"),
        "{e}"
    );
    let sig = signed(&sk, "dev/scratch", "0.1.0", None);
    assert_eq!(
        p.check(&repo("dev/scratch"), &v("0.1.0"), MANIFEST, Some(sig.as_bytes()), NOW)
            .unwrap(),
        TrustDecision::Unsigned
    );
}

#[test]
fn configured_keys_require_a_signature() {
    // Not strict, but a key is configured for acme/*: stripping the signature must not
    // get around it.
    let (pk, _) = key();
    let p = TrustPolicy::permissive().trust_key("acme/*", pk);
    let e = p.check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, None, NOW).unwrap_err();
    assert!(matches!(e, TrustError::Unsigned { keys_configured: true, .. }), "{e}");
    assert_eq!(
        p.check(&repo("other/x"), &v("1.2.3"), MANIFEST, None, NOW).unwrap(),
        TrustDecision::Unsigned
    );
    let p = p.allow_unsigned("acme/activation");
    assert_eq!(
        p.check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, None, NOW).unwrap(),
        TrustDecision::Unsigned
    );
}

#[test]
fn invalid_builder_patterns_fail_closed() {
    let p = TrustPolicy::permissive().allow_unsigned("not a pattern");
    let e = p.check(&repo("acme/activation"), &v("1.2.3"), MANIFEST, None, NOW).unwrap_err();
    assert!(
        matches!(e, TrustError::InvalidPolicy { .. }) && e.to_string().contains("not a pattern"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let state = RollbackState::open(dir.path()).unwrap();
    let req = semver::VersionReq::parse("*").unwrap();
    assert!(state.check(&p, &repo("acme/activation"), &req, &v("1.0.0")).is_err());
}

#[test]
fn policy_file_parses() {
    let dir = tempfile::tempdir().unwrap();
    let (acme, _) = key();
    let (file_key, _) = key();
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    std::fs::write(dir.path().join("keys/other.pub"), file_key.to_file_text()).unwrap();
    let abs = dir.path().join("keys/other.pub");
    let text = format!(
        r#"
require-signature = true
allow-unsigned = ["dev/*"]
allow-rollback = ["acme/legacy"]

[[publisher]]
repos = ["acme/*", "kernels-community/activation"]
keys = ["{acme}", "keys/other.pub"]

[[publisher]]
repos = ["*"]
keys = ["{}"]
"#,
        abs.display()
    );
    let path = dir.path().join("trust.toml");
    std::fs::write(&path, &text).unwrap();
    let p = TrustPolicy::read(&path).unwrap();
    assert!(p.requires_signature());
    assert!(p.allows_unsigned(&repo("dev/x")) && !p.allows_unsigned(&repo("acme/x")));
    assert!(p.allows_rollback(&repo("acme/legacy")) && !p.allows_rollback(&repo("acme/x")));
    assert_eq!(p.keys_for(&repo("acme/x")), vec![&acme, &file_key]);
    assert_eq!(p.keys_for(&repo("zzz/x")), vec![&file_key]);
    assert_eq!(TrustPolicy::from_toml("", dir.path()).unwrap(), TrustPolicy::permissive());
}

#[test]
fn policy_file_errors_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("require-signatures = true", "require-signatures"),
        ("allow-unsigned = [\"dev\"]", "allow-unsigned[0]"),
        ("allow-rollback = [\"*\", \"a/b/c\"]", "allow-rollback[1]"),
        ("[[publisher]]\nrepos = []\nkeys = [\"x\"]", "publisher[0].repos"),
        ("[[publisher]]\nrepos = [\"a/*\"]\nkeys = []", "publisher[0].keys"),
        (
            "[[publisher]]\nrepos = [\"a/x\", \"a/\"]\nkeys = [\"k.pub\"]",
            "publisher[0].repos[1]",
        ),
        ("[[publisher]]\nrepos = [\"a/*\"]\nkeys = [\"missing.pub\"]", "publisher[0].keys[0]"),
        (
            "[[publisher]]\nrepos = [\"a/*\"]\nkeys = [\"RWQ", /* truncated inline */
            "publisher[0].keys[0]",
        ),
        ("[[publisher]]\nrepos = [\"a/*\"]\nkeys = [\"k.pub\"]\nkey = \"x\"", "key"),
        ("require-signature = \"yes\"", "require-signature"),
    ];
    for (text, field) in cases {
        let text = if text.ends_with("RWQ") {
            format!("{text}\"]")
        } else {
            text.to_owned()
        };
        let e = TrustPolicy::from_toml(&text, dir.path()).unwrap_err();
        assert!(e.to_string().contains(field), "{text}: {e}");
    }
}

#[test]
fn from_env_finds_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    // Nothing set: permissive.
    assert_eq!(TrustPolicy::from_env(&Environment::empty()).unwrap(), TrustPolicy::permissive());
    // HOME without a file: permissive.
    let env = Environment::from_pairs([("HOME", d.as_str())]);
    assert_eq!(TrustPolicy::from_env(&env).unwrap(), TrustPolicy::permissive());
    // $HOME/.config/khub/trust.toml.
    std::fs::create_dir_all(dir.path().join(".config/khub")).unwrap();
    std::fs::write(dir.path().join(".config/khub/trust.toml"), "require-signature = true\n").unwrap();
    assert!(TrustPolicy::from_env(&env).unwrap().requires_signature());
    // XDG_CONFIG_HOME wins over HOME.
    let xdg = dir.path().join("xdg");
    std::fs::create_dir_all(xdg.join("khub")).unwrap();
    let x = xdg.display().to_string();
    let env = Environment::from_pairs([("HOME", d.as_str()), ("XDG_CONFIG_HOME", x.as_str())]);
    assert!(!TrustPolicy::from_env(&env).unwrap().requires_signature());
    std::fs::write(xdg.join("khub/trust.toml"), "bogus = 1\n").unwrap();
    assert!(matches!(TrustPolicy::from_env(&env), Err(TrustError::InvalidPolicy { .. })));
    // KHUB_TRUST_POLICY wins, and must exist.
    let explicit = dir.path().join("explicit.toml");
    let e = explicit.display().to_string();
    let env = Environment::from_pairs([("HOME", d.as_str()), ("KHUB_TRUST_POLICY", e.as_str())]);
    let err = TrustPolicy::from_env(&env).unwrap_err();
    assert!(
        matches!(err, TrustError::MissingPolicy { .. }) && err.to_string().contains("KHUB_TRUST_POLICY"),
        "{err}"
    );
    std::fs::write(&explicit, "allow-unsigned = [\"*\"]\n").unwrap();
    assert!(TrustPolicy::from_env(&env).unwrap().allows_unsigned(&repo("a/b")));
}

#[test]
fn default_state_dir() {
    let env = |pairs: &[(&str, &str)]| RollbackState::default_dir(&Environment::from_pairs(pairs.iter().copied()));
    assert_eq!(
        env(&[("KHUB_STATE_DIR", "/s"), ("XDG_STATE_HOME", "/x"), ("HOME", "/h")]).unwrap(),
        PathBuf::from("/s")
    );
    assert_eq!(env(&[("XDG_STATE_HOME", "/x"), ("HOME", "/h")]).unwrap(), PathBuf::from("/x/khub"));
    assert_eq!(
        env(&[("XDG_STATE_HOME", "rel"), ("HOME", "/h")]).unwrap(),
        PathBuf::from("/h/.local/state/khub")
    );
    assert!(matches!(env(&[]), Err(TrustError::NoStateDir)));
}

#[test]
fn rollback_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let state = RollbackState::open(&dir.path().join("state")).unwrap();
    let r = repo("acme/activation");
    let any = semver::VersionReq::parse(">=1").unwrap();
    let p = TrustPolicy::permissive();
    assert_eq!(state.highest(&r), None);
    state.check(&p, &r, &any, &v("1.0.0")).unwrap();
    state.record(&r, &v("1.3.0")).unwrap();
    assert_eq!(state.highest(&r), Some(v("1.3.0")));
    // Lower, and the requirement admits 1.3.0: refused.
    let e = state.check(&p, &r, &any, &v("1.2.0")).unwrap_err();
    assert!(matches!(e, TrustError::Rollback { .. }), "{e}");
    assert!(e.to_string().contains("--allow-rollback") && e.to_string().contains("1.3.0"), "{e}");
    // Same or higher: fine.
    state.check(&p, &r, &any, &v("1.3.0")).unwrap();
    state.check(&p, &r, &any, &v("2.0.0")).unwrap();
    // A requirement that excludes 1.3.0 is the host's choice.
    state
        .check(&p, &r, &semver::VersionReq::parse("~1.2").unwrap(), &v("1.2.0"))
        .unwrap();
    // Other repos are independent.
    state.check(&p, &repo("acme/norm"), &any, &v("0.1.0")).unwrap();
    // Allowed by pattern.
    state.check(&p.clone().allow_rollback("acme/*"), &r, &any, &v("1.2.0")).unwrap();
    state.check(&p.clone().allow_rollback("*"), &r, &any, &v("1.2.0")).unwrap();
    assert!(state.check(&p.clone().allow_rollback("acme/norm"), &r, &any, &v("1.2.0")).is_err());
}

#[test]
fn record_keeps_the_max_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let r = repo("acme/activation");
    let state = RollbackState::open(dir.path()).unwrap();
    state.record(&r, &v("1.3.0")).unwrap();
    state.record(&r, &v("1.2.0")).unwrap();
    assert_eq!(state.highest(&r), Some(v("1.3.0")));
    state.record(&r, &v("1.3.0-rc.1")).unwrap();
    assert_eq!(state.highest(&r), Some(v("1.3.0")));
    // A fresh reader sees it; a stale one is brought up to date by its next record.
    let stale = RollbackState::open(dir.path()).unwrap();
    state.record(&r, &v("1.4.0")).unwrap();
    assert_eq!(stale.highest(&r), Some(v("1.3.0")));
    stale.record(&repo("acme/norm"), &v("0.1.0")).unwrap();
    assert_eq!(stale.highest(&r), Some(v("1.4.0")));
    let fresh = RollbackState::open(dir.path()).unwrap();
    assert_eq!(fresh.highest(&r), Some(v("1.4.0")));
    assert_eq!(fresh.highest(&repo("acme/norm")), Some(v("0.1.0")));
    // No temp files are left behind.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec![ROLLBACK_LOCK, ROLLBACK_FILE]);
}

#[test]
fn corrupt_state_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    for text in [
        "garbage",
        "version = 2\n",
        "version = 1\n[highest]\n\"acme\" = \"1.0.0\"\n",
        "version = 1\n[highest]\n\"acme/x\" = \"one\"\n",
        "version = 1\nextra = true\n",
    ] {
        std::fs::write(dir.path().join(ROLLBACK_FILE), text).unwrap();
        let e = RollbackState::open(dir.path()).unwrap_err();
        assert!(
            matches!(e, TrustError::StateInvalid { .. }) && e.to_string().contains("delete it"),
            "{text}: {e}"
        );
    }
}

#[test]
fn concurrent_records_keep_the_max() {
    let dir = tempfile::tempdir().unwrap();
    let repos = [repo("acme/a"), repo("acme/b")];
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let dir = dir.path();
            let repos = &repos;
            s.spawn(move || {
                // Each thread opens its own state, as separate processes would.
                let state = RollbackState::open(dir).unwrap();
                for i in 0..10u64 {
                    let minor = (t * 7 + i * 3) % 40;
                    state.record(&repos[(i % 2) as usize], &semver::Version::new(1, minor, t)).unwrap();
                }
            });
        }
    });
    let state = RollbackState::open(dir.path()).unwrap();
    // The max over every (t, i) that wrote each repo.
    let expected = |parity: u64| {
        (0..8u64)
            .flat_map(|t| {
                (0..10u64)
                    .filter(move |i| i % 2 == parity)
                    .map(move |i| semver::Version::new(1, (t * 7 + i * 3) % 40, t))
            })
            .max()
            .unwrap()
    };
    assert_eq!(state.highest(&repos[0]), Some(expected(0)));
    assert_eq!(state.highest(&repos[1]), Some(expected(1)));
}
