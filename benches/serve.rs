//! `khub serve` against nginx serving the same bytes as static files, on loopback, in the
//! same run: GET throughput of a 16 MiB file and of a small metadata request
//! (`/api/models/acme/k`, whose answer khub computes from the registry and nginx reads
//! from a file holding khub's answer). Each client keeps its connection alive.
//!
//! `cargo bench --bench serve` (nginx from Debian's `nginx` package; skipped with a message
//! when it is missing). Prints one table with the ratio khub / nginx.
#![allow(clippy::disallowed_methods)] // bench code: scratch files are its own

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use khub::serve::{ServeOptions, Server};

const BIG: usize = 16 << 20;
const BIG_PATH: &str = "/acme/k/resolve/main/variants/a/big.bin";
const META_PATH: &str = "/api/models/acme/k";

fn nginx() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// A registry with one release holding a 16 MiB file.
fn registry(root: &Path) -> Vec<u8> {
    let dir = root.join("acme/k/1.0.0");
    std::fs::create_dir_all(dir.join("variants/a")).unwrap();
    let mut big = vec![0u8; BIG];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for b in big.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(dir.join("variants/a/big.bin"), &big).unwrap();
    let manifest = format!(
        "schema = \"1.0\"\n[kernel]\nname = \"k\"\nversion = \"1.0.0\"\nabi = 1\n\n[[variants]]\nid = \"a\"\nbackend = \"cpu\"\nos = \"linux\"\narch = \"x86_64\"\nlibc = \"glibc 2.17\"\nlibrary = \"variants/a/big.bin\"\nfiles = [{{ path = \"variants/a/big.bin\", size = {BIG}, sha256 = \"{}\" }}]\n",
        khub::verify::sha256(&big)
    );
    std::fs::write(dir.join("khub.toml"), manifest).unwrap();
    big
}

/// A kept-alive client: sends GET `path` and reads the answer, `Content-Length` bytes.
struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    fn new(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        Client {
            w: s.try_clone().unwrap(),
            r: BufReader::with_capacity(256 << 10, s),
            buf: vec![0; BIG],
        }
    }

    /// One request; the body's length.
    fn get(&mut self, path: &str) -> usize {
        write!(self.w, "GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").unwrap();
        let mut line = String::new();
        let mut len = None;
        let mut status = 0;
        loop {
            line.clear();
            self.r.read_line(&mut line).unwrap();
            if status == 0 {
                status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().ok();
            }
        }
        assert_eq!(status, 200, "GET {path}");
        let len: usize = len.expect("no Content-Length");
        self.r.read_exact(&mut self.buf[..len]).unwrap();
        len
    }
}

/// Requests a second and bytes a second of `clients` kept-alive clients getting `path`
/// for `secs`.
fn measure(addr: SocketAddr, path: &str, clients: usize, secs: f64) -> (f64, f64) {
    let stop = Instant::now() + Duration::from_secs_f64(secs);
    let t = Instant::now();
    let (n, bytes) = std::thread::scope(|s| {
        let hs: Vec<_> = (0..clients)
            .map(|_| {
                s.spawn(move || {
                    let mut c = Client::new(addr);
                    let (mut n, mut bytes) = (0u64, 0u64);
                    while Instant::now() < stop {
                        bytes += c.get(path) as u64;
                        n += 1;
                    }
                    (n, bytes)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    });
    let el = t.elapsed().as_secs_f64();
    (n as f64 / el, bytes as f64 / el)
}

struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts nginx on a free loopback port serving `docroot`, two workers (one a core).
fn start_nginx(bin: &Path, work: &Path, docroot: &Path) -> (Nginx, SocketAddr) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // SAFETY: geteuid has no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 { "user root;\n" } else { "" };
    let t = work.display();
    let conf = format!(
        "{user}daemon off;\nworker_processes 2;\npid {t}/nginx.pid;\nerror_log {t}/error.log;\nevents {{ worker_connections 1024; }}\nhttp {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  tcp_nodelay on;\n  keepalive_requests 1000000;\n  default_type application/octet-stream;\n  client_body_temp_path {t}/body;\n  proxy_temp_path {t}/proxy;\n  fastcgi_temp_path {t}/fastcgi;\n  uwsgi_temp_path {t}/uwsgi;\n  scgi_temp_path {t}/scgi;\n  server {{\n    listen 127.0.0.1:{port};\n    root {};\n    location / {{ }}\n  }}\n}}\n",
        docroot.display()
    );
    let conf_path = work.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf_path)
        .arg("-p")
        .arg(work)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nginx did not start: see {t}/error.log");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Nginx(child), addr)
}

fn main() {
    let Some(nginx_bin) = nginx() else {
        println!("serve bench skipped: nginx is not installed (apt-get install nginx)");
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("registry");
    let big = registry(&root);
    let mut options = ServeOptions::default();
    options.limits.rate_per_second = 0.0;
    let server = Server::start(&root, "127.0.0.1:0", options).unwrap();
    let khub_addr = server.addr();

    // nginx serves the same bytes at the same paths: the file, and khub's metadata answer.
    let docroot = work.path().join("www");
    let mut c = Client::new(khub_addr);
    assert_eq!(c.get(BIG_PATH), BIG);
    assert_eq!(&c.buf[..BIG], &big[..]);
    let meta_len = c.get(META_PATH);
    let meta = c.buf[..meta_len].to_vec();
    drop(c);
    for (path, bytes) in [(BIG_PATH, &big[..]), (META_PATH, &meta[..])] {
        let p = docroot.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    {
        use std::os::unix::fs::PermissionsExt;
        for d in [work.path(), &docroot] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    let nginx_work = work.path().join("nginx");
    std::fs::create_dir_all(&nginx_work).unwrap();
    let (_nginx, nginx_addr) = start_nginx(&nginx_bin, &nginx_work, &docroot);
    let mut c = Client::new(nginx_addr);
    assert_eq!(c.get(BIG_PATH), BIG);
    assert_eq!(c.get(META_PATH), meta_len);
    drop(c);

    let secs: f64 = std::env::var("KHUB_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let rounds = 3;
    println!("serve bench: {rounds} rounds of {secs} s each, interleaved; median of the rounds");
    println!("{:<34} {:>14} {:>14} {:>8}", "case", "khub serve", "nginx", "ratio");
    for (name, path, clients, unit) in [
        ("GET 16 MiB file, 1 client", BIG_PATH, 1, "MiB/s"),
        ("GET 16 MiB file, 4 clients", BIG_PATH, 4, "MiB/s"),
        ("GET /api/models/acme/k, 1 client", META_PATH, 1, "req/s"),
        ("GET /api/models/acme/k, 8 clients", META_PATH, 8, "req/s"),
    ] {
        let mut k = Vec::new();
        let mut n = Vec::new();
        for _ in 0..rounds {
            for (addr, out) in [(khub_addr, &mut k), (nginx_addr, &mut n)] {
                let (rps, bps) = measure(addr, path, clients, secs);
                out.push(if unit == "req/s" { rps } else { bps / f64::from(1 << 20) });
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (k, n) = (median(&mut k), median(&mut n));
        println!("{name:<34} {:>8.0} {unit} {:>8.0} {unit} {:>7.0}%", k, n, 100.0 * k / n);
    }
    drop(server);
}
