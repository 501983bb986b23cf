//! `khub serve` against the real Python client, `huggingface_hub`: downloads into the Hub
//! cache, snapshots with patterns, refs, paginated trees, `upload_folder` publishing new
//! releases (one with a README.md, whose front matter the client has the server validate),
//! and `list_models` with `author=` and `search=`, over kept-alive connections. Skipped when
//! `huggingface_hub` is not installed.
#![allow(clippy::disallowed_methods)] // test code: scratch files and the process environment are its own
#![cfg(feature = "serve")]

use std::path::Path;
use std::process::Command;

use khub::serve::{ServeOptions, Server};

const WRITE: &str = "hf_khub_write_token";

fn manifest(version: &str, libs: [&[u8]; 2]) -> String {
    let mut text = format!("schema = \"1.0\"\n[kernel]\nname = \"k\"\nversion = \"{version}\"\nabi = 1\n");
    for (id, arch, lib) in [("a", "x86_64", libs[0]), ("b", "aarch64", libs[1])] {
        text += &format!(
            "\n[[variants]]\nid = \"{id}\"\nbackend = \"cpu\"\nos = \"linux\"\narch = \"{arch}\"\nlibc = \"glibc 2.17\"\nlibrary = \"variants/{id}/libk.so\"\nfiles = [{{ path = \"variants/{id}/libk.so\", size = {}, sha256 = \"{}\" }}]\n",
            lib.len(),
            khub::verify::sha256(lib)
        );
    }
    text
}

/// Writes a release directory at `dir`.
fn write_release(dir: &Path, version: &str) {
    let libs: Vec<Vec<u8>> = ["a", "b"]
        .iter()
        .map(|id| format!("library {id} of {version}\n").into_bytes())
        .collect();
    for (id, lib) in ["a", "b"].iter().zip(&libs) {
        std::fs::create_dir_all(dir.join("variants").join(id)).unwrap();
        std::fs::write(dir.join(format!("variants/{id}/libk.so")), lib).unwrap();
    }
    std::fs::write(dir.join("khub.toml"), manifest(version, [&libs[0], &libs[1]])).unwrap();
}

const SCRIPT: &str = r#"
import os, sys
import huggingface_hub
from huggingface_hub import HfApi, hf_hub_download, snapshot_download, constants
from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError, RepositoryNotFoundError, HfHubHTTPError

repo = "acme/k"
new_release, write_token, expected_new_commit = sys.argv[1], sys.argv[2], sys.argv[3]
print("huggingface_hub", huggingface_hub.__version__)

p = hf_hub_download(repo, "khub.toml", revision="v1.0.0")
assert 'version = "1.0.0"' in open(p).read(), p
assert os.path.islink(p), "a cache-mode download is a symlink into blobs/"

snap = snapshot_download(repo, revision="v1.0.0", allow_patterns=["variants/a/*"])
got = sorted(os.path.relpath(os.path.join(d, f), snap) for d, _, fs in os.walk(snap) for f in fs)
assert "variants/a/libk.so" in got and not any(g.startswith("variants/b") for g in got), got
assert open(os.path.join(snap, "variants/a/libk.so")).read() == "library a of 1.0.0\n"

api = HfApi()
refs = api.list_repo_refs(repo)
tags = sorted(t.name for t in refs.tags)
branches = sorted(b.name for b in refs.branches)
assert tags == ["v1.0.0", "v1.2.0"], tags
assert branches == ["main", "v1"], branches

tree = [(type(e).__name__, e.path) for e in api.list_repo_tree(repo, revision="main", recursive=True)]
assert tree == [("RepoFile", "khub.toml"), ("RepoFolder", "variants"), ("RepoFolder", "variants/a"),
                ("RepoFile", "variants/a/libk.so"), ("RepoFolder", "variants/b"), ("RepoFile", "variants/b/libk.so")], tree
expanded = list(api.list_repo_tree(repo, revision="v1", path_in_repo="variants/a", expand=True))
assert expanded[0].last_commit is not None, expanded

info = api.model_info(repo, revision="v1.0.0", files_metadata=True)
assert sorted(s.rfilename for s in info.siblings) == ["khub.toml", "variants/a/libk.so", "variants/b/libk.so"], info.siblings
assert api.file_exists(repo, "khub.toml") and not api.file_exists(repo, "nope.txt")
assert api.repo_exists(repo) and not api.repo_exists("acme/none")
assert api.revision_exists(repo, "v1.2.0") and not api.revision_exists(repo, "v7")

for call, err in [
    (lambda: hf_hub_download(repo, "nope.txt", revision="v1.0.0"), EntryNotFoundError),
    (lambda: hf_hub_download(repo, "khub.toml", revision="v9.9.9"), RevisionNotFoundError),
    (lambda: hf_hub_download("acme/none", "khub.toml"), RepositoryNotFoundError),
]:
    try:
        call()
        raise AssertionError("no error")
    except err:
        pass

writer = HfApi(token=write_token)
writer.create_repo(repo, exist_ok=True)
try:
    api.upload_folder(repo_id=repo, folder_path=new_release, commit_message="anonymous")
    raise AssertionError("an anonymous upload succeeded")
except HfHubHTTPError as e:
    assert e.response.status_code in (401, 403), e
commit = writer.upload_folder(repo_id=repo, folder_path=new_release, commit_message="release 1.3.0")
assert commit.oid == expected_new_commit, (commit.oid, expected_new_commit)
refs = api.list_repo_refs(repo)
assert "v1.3.0" in [t.name for t in refs.tags], refs
assert [b.target_commit for b in refs.branches if b.name == "main"] == [expected_new_commit], refs
p = hf_hub_download(repo, "variants/b/libk.so", revision="v1.3.0")
assert open(p).read() == "library b of 1.3.0\n"
try:
    writer.upload_folder(repo_id=repo, folder_path=new_release, commit_message="again")
    raise AssertionError("a release was published twice")
except HfHubHTTPError as e:
    assert e.response.status_code == 409, e

# A folder with a README.md: the client has the server validate its front matter first.
readme_release, bad_readme_release, expected_readme_commit = sys.argv[4], sys.argv[5], sys.argv[6]
commit = writer.upload_folder(repo_id=repo, folder_path=readme_release, commit_message="release 1.4.0 with a card")
assert commit.oid == expected_readme_commit, (commit.oid, expected_readme_commit)
p = hf_hub_download(repo, "README.md", revision="v1.4.0")
assert "license: apache-2.0" in open(p).read()
try:
    writer.upload_folder(repo_id=repo, folder_path=bad_readme_release, commit_message="broken card")
    raise AssertionError("a README with broken metadata was accepted")
except ValueError as e:
    assert "Invalid metadata" in str(e), e
assert "v1.5.0" not in [t.name for t in api.list_repo_refs(repo).tags]

# Listings, with the filters huggingface_hub sends.
writer.create_repo("other/x", exist_ok=True)
assert sorted(m.id for m in api.list_models()) == ["acme/k", "other/x"], list(api.list_models())
acme = list(api.list_models(author="acme"))
assert [m.id for m in acme] == ["acme/k"], acme
assert acme[0].sha == expected_readme_commit and acme[0].author == "acme", acme[0]
assert [m.id for m in api.list_models(search="OTHER")] == ["other/x"]
assert len(list(api.list_models(limit=1))) == 1
assert list(api.list_models(author="nobody")) == []

if "kernel" in getattr(constants, "REPO_TYPES_WITH_KERNEL", []):
    p = hf_hub_download(repo, "khub.toml", revision="v1.2.0", repo_type="kernel")
    assert 'version = "1.2.0"' in open(p).read()
    assert "kernels--acme--k" in p, p
    refs = api.list_repo_refs(repo, repo_type="kernel")
    assert "v1.3.0" in [t.name for t in refs.tags]
    files = [e.path for e in api.list_repo_tree(repo, repo_type="kernel", revision="v1.3.0", recursive=True)]
    assert "variants/b/libk.so" in files, files
    print("kernel repo type: ok")
print("OK")
"#;

#[test]
fn huggingface_hub_talks_to_khub_serve() {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let have = Command::new(&python)
        .args(["-c", "import huggingface_hub"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        println!("skipped: pip install huggingface_hub");
        return;
    }
    let reg = tempfile::tempdir().unwrap();
    write_release(&reg.path().join("acme/k/1.0.0"), "1.0.0");
    write_release(&reg.path().join("acme/k/1.2.0"), "1.2.0");
    let work = tempfile::tempdir().unwrap();
    let new_release = work.path().join("release-1.3.0");
    write_release(&new_release, "1.3.0");
    let expected = khub::registry::dir::commit_id(&std::fs::read(new_release.join("khub.toml")).unwrap());
    let readme_release = work.path().join("release-1.4.0");
    write_release(&readme_release, "1.4.0");
    std::fs::write(
        readme_release.join("README.md"),
        "---\nlicense: apache-2.0\ntags:\n- kernels\n---\n# k\n\nA kernel.\n",
    )
    .unwrap();
    let expected_readme = khub::registry::dir::commit_id(&std::fs::read(readme_release.join("khub.toml")).unwrap());
    let bad_readme_release = work.path().join("release-1.5.0");
    write_release(&bad_readme_release, "1.5.0");
    std::fs::write(bad_readme_release.join("README.md"), "---\nlicense: mit\n# never closed\n").unwrap();
    let c10 = khub::registry::dir::commit_id(&std::fs::read(reg.path().join("acme/k/1.0.0/khub.toml")).unwrap());
    let script = work.path().join("check.py");
    std::fs::write(&script, SCRIPT).unwrap();

    let options = ServeOptions {
        write_token: Some(WRITE.into()),
        page_size: 2,
        ..Default::default()
    };
    let server = Server::start(reg.path(), "127.0.0.1:0", options).unwrap();
    let mut cmd = Command::new(&python);
    cmd.arg(&script)
        .arg(&new_release)
        .arg(WRITE)
        .arg(&expected)
        .arg(&readme_release)
        .arg(&bad_readme_release)
        .arg(&expected_readme)
        .current_dir(work.path());
    for var in [
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN_PATH",
        "HF_HUB_OFFLINE",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_XET_CACHE",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HF_ENDPOINT", server.url())
        .env("HF_HOME", work.path().join("hf-home"))
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env("HF_HUB_ENABLE_HF_TRANSFER", "0")
        .env("HF_HUB_DISABLE_XET", "1")
        .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        .env("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost");
    let out = cmd.output().unwrap();
    let log: Vec<String> = server
        .requests()
        .iter()
        .map(|r| format!("{} {} -> {}", r.method, r.path, r.status))
        .collect();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("OK"),
        "python failed\nstdout:\n{stdout}\nstderr:\n{}\nrequests:\n{}",
        String::from_utf8_lossy(&out.stderr),
        log.join("\n")
    );
    println!("{stdout}");
    // The snapshot with a pattern fetched only the files it matched.
    let fetched_b = |l: &&String| l.contains("/resolve/") && l.contains("variants/b") && (l.contains("v1.0.0") || l.contains(&c10));
    assert!(!log.iter().any(|l| fetched_b(&l)), "{log:#?}");
    assert!(
        log.iter().any(|l| l.contains(&format!("/resolve/{c10}/variants/a/libk.so"))),
        "{log:#?}"
    );
    // The client reuses its connections: far fewer connections than requests.
    assert!(
        server.connections() * 2 < log.len() as u64,
        "{} connections for {} requests",
        server.connections(),
        log.len()
    );
    assert!(log.iter().any(|l| l.starts_with("POST /api/validate-yaml -> 200")), "{log:#?}");
    assert!(log.iter().any(|l| l.starts_with("POST /api/validate-yaml -> 400")), "{log:#?}");
    // The README is stored in its release, beside the manifest.
    assert!(reg.path().join("acme/k/1.4.0/README.md").is_file());
    // The new release is on disk, complete.
    assert!(reg.path().join("acme/k/1.3.0/variants/b/libk.so").is_file());
    assert!(
        !std::fs::read_dir(reg.path().join("acme/k"))
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().starts_with(".staging"))
    );
}
