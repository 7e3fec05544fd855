//! `kmesh-testpod`: the workload of the test harness. It first moves itself
//! into a pod (`--netns`, `--cgroup`), then acts as a server or a client.
//!
//! - `serve NAME ADDR...`: accepts on every ADDR; each connection gets
//!   `NAME\n`, then everything it sends is echoed back.
//! - `connect ADDR COUNT`: COUNT sequential connections to ADDR; prints
//!   one JSON line `{"backends":{name:count},"errors":n,"peer_mismatch":n,"error_kinds":{..}}`.
//!   `peer_mismatch` counts connections whose getpeername() was not ADDR.
//! - `loop ADDR MILLIS`: sequential connections to ADDR for MILLIS
//!   milliseconds; prints the same JSON line as `connect`.
//! - `talk ADDR COUNT BYTES`: COUNT sequential connections to ADDR; on each,
//!   reads the backend's name line, sends BYTES bytes, reads the BYTES echoed
//!   back, then closes; prints `{"backends":{..},"errors":n,"sent":n,"received":n}`
//!   with the byte totals as the application saw them (name lines included).
//! - `hold ADDR COUNT`: opens COUNT connections, prints their backends as a
//!   JSON line, then for every line `check` on stdin sends a probe on each
//!   connection and prints how many echoed it back; ends on EOF.
//! - `send ADDR`: one connection to ADDR; every stdin line is a JSON string
//!   written in one write(); then one line is read back from the peer and
//!   printed. Ends on EOF.
//! - `http ADDR...`: a minimal HTTP/1.1 server for benchmarks: every
//!   request gets `200 ok` (2-byte body); keep-alive unless the request
//!   says `Connection: close`. One thread per connection (64 KiB stacks),
//!   so 1,000+ concurrent connections cost memory, not CPU.
//! - `http-named NAME ADDR...`: the same server, answering `NAME` as the
//!   body, so an HTTP client can tell which backend answered.
//! - `get ADDR COUNT [HEADER]`: COUNT sequential HTTP/1.1 GET requests to
//!   ADDR, one connection each (`Connection: close`), with the extra
//!   request header `HEADER` (`name: value`) if given; prints the `connect`
//!   JSON line with the response bodies as backend names (a non-200
//!   answer counts as an error of kind `status <code>`).
//! - `http-client ADDR`: one kept-alive connection; every stdin line is a
//!   JSON string sent as one write, then one response is read and printed
//!   as a JSON line (status, body, peer = getpeername()).
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

/// Connect timeout (`--timeout-ms`, default 3000): a short one lets a
/// test tell a dropped SYN from a slow accept quickly.
static CONNECT_TIMEOUT_MS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    while args.first().is_some_and(|a| a.starts_with("--")) {
        let flag = args.remove(0);
        let value = args.remove(0);
        match flag.as_str() {
            "--netns" => enter_netns(&value),
            "--cgroup" => std::fs::write(
                format!("{value}/cgroup.procs"),
                std::process::id().to_string(),
            )
            .unwrap_or_else(|e| die(&format!("joining cgroup {value}: {e}"))),
            "--timeout-ms" => {
                let ms = value
                    .parse()
                    .unwrap_or_else(|_| die(&format!("--timeout-ms {value}: not a number")));
                let _ = CONNECT_TIMEOUT_MS.set(ms);
            }
            _ => die(&format!("unknown flag {flag}")),
        }
    }
    match args.first().map(String::as_str) {
        Some("serve") if args.len() >= 3 => serve(&args[1], &args[2..]),
        Some("connect") if args.len() == 3 => connect(parse_addr(&args[1]), parse_count(&args[2]), None),
        Some("talk") if args.len() == 4 => talk(
            parse_addr(&args[1]),
            parse_count(&args[2]),
            parse_count(&args[3]),
        ),
        Some("hold") if args.len() == 3 => hold(parse_addr(&args[1]), parse_count(&args[2])),
        Some("loop") if args.len() == 3 => {
            let until = std::time::Instant::now() + Duration::from_millis(parse_count(&args[2]) as u64);
            connect(parse_addr(&args[1]), usize::MAX, Some(until))
        }
        Some("http") if args.len() >= 2 => http("ok", &args[1..]),
        Some("http-named") if args.len() >= 3 => {
            http(Box::leak(args[1].clone().into_boxed_str()), &args[2..])
        }
        Some("get") if args.len() == 3 || args.len() == 4 => get(
            parse_addr(&args[1]),
            parse_count(&args[2]),
            args.get(3).map(String::as_str),
        ),
        Some("http-client") if args.len() == 2 => http_client(parse_addr(&args[1])),
        Some("send") if args.len() == 2 => send(parse_addr(&args[1])),
        _ => die("usage: kmesh-testpod [--netns PATH] [--cgroup DIR] [--timeout-ms N] serve NAME ADDR... | connect ADDR N | loop ADDR MILLIS | talk ADDR N BYTES | hold ADDR N | http ADDR... | http-named NAME ADDR... | get ADDR N [HEADER] | http-client ADDR | send ADDR"),
    }
}

fn die(msg: &str) -> ! {
    eprintln!("kmesh-testpod: {msg}");
    std::process::exit(2)
}

fn parse_addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|e| die(&format!("bad address {s}: {e}")))
}

fn parse_count(s: &str) -> usize {
    s.parse()
        .unwrap_or_else(|e| die(&format!("bad count {s}: {e}")))
}

fn enter_netns(path: &str) {
    let f = std::fs::File::open(path).unwrap_or_else(|e| die(&format!("open {path}: {e}")));
    // SAFETY: `f` is an open namespace fd; the process is still single-threaded.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        die(&format!(
            "setns {path}: {}",
            std::io::Error::last_os_error()
        ));
    }
}

fn serve(name: &str, addrs: &[String]) {
    let mut threads = Vec::new();
    for a in addrs {
        let addr = parse_addr(a);
        let l = TcpListener::bind(addr).unwrap_or_else(|e| die(&format!("bind {addr}: {e}")));
        let name = name.to_string();
        threads.push(std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || echo(s, &name));
            }
        }));
    }
    // Tell the harness the listeners are bound.
    println!("ready");
    let _ = std::io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
}

fn echo(mut s: TcpStream, name: &str) {
    if s.write_all(format!("{name}\n").as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Connects and reads the backend's name.
fn dial(addr: SocketAddr) -> std::io::Result<(String, bool, BufReader<TcpStream>)> {
    let timeout = Duration::from_millis(*CONNECT_TIMEOUT_MS.get().unwrap_or(&3000));
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let peer_ok = s.peer_addr()? == addr;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before name",
        ));
    }
    Ok((line.trim().to_string(), peer_ok, r))
}

fn connect(addr: SocketAddr, count: usize, until: Option<std::time::Instant>) {
    let mut backends: BTreeMap<String, usize> = BTreeMap::new();
    let mut error_kinds: BTreeMap<String, usize> = BTreeMap::new();
    let (mut errors, mut peer_mismatch) = (0, 0);
    for _ in 0..count {
        if until.is_some_and(|t| std::time::Instant::now() >= t) {
            break;
        }
        match dial(addr) {
            Ok((name, peer_ok, _)) => {
                *backends.entry(name).or_default() += 1;
                if !peer_ok {
                    peer_mismatch += 1;
                }
            }
            Err(e) => {
                errors += 1;
                *error_kinds.entry(format!("{:?}", e.kind())).or_default() += 1;
            }
        }
    }
    println!(
        "{}",
        serde_json::json!({"backends": backends, "errors": errors, "peer_mismatch": peer_mismatch, "error_kinds": error_kinds})
    );
}

fn talk(addr: SocketAddr, count: usize, bytes: usize) {
    let mut backends: BTreeMap<String, usize> = BTreeMap::new();
    let (mut errors, mut sent, mut received) = (0usize, 0usize, 0usize);
    let payload: Vec<u8> = (0..bytes).map(|i| b'a' + (i % 26) as u8).collect();
    for _ in 0..count {
        let one = || -> std::io::Result<(String, usize, usize)> {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            // Generous: byte counts are compared exactly, so a client that
            // gave up on a slow (loaded) server would skew them.
            s.set_read_timeout(Some(Duration::from_secs(15)))?;
            let mut r = BufReader::new(s);
            let mut name = String::new();
            r.read_line(&mut name)?;
            let name = name.trim().to_string();
            r.get_mut().write_all(&payload)?;
            let mut back = vec![0u8; bytes];
            r.read_exact(&mut back)?;
            if back != payload {
                return Err(std::io::Error::other("echo differs"));
            }
            Ok((name.clone(), bytes, name.len() + 1 + bytes))
        };
        match one() {
            Ok((name, s, r)) => {
                *backends.entry(name).or_default() += 1;
                sent += s;
                received += r;
            }
            Err(_) => errors += 1,
        }
    }
    println!(
        "{}",
        serde_json::json!({"backends": backends, "errors": errors, "sent": sent, "received": received})
    );
}

fn hold(addr: SocketAddr, count: usize) {
    let mut conns = Vec::new();
    let mut backends: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..count {
        let (name, _, r) = dial(addr).unwrap_or_else(|e| die(&format!("connect {addr}: {e}")));
        *backends.entry(name).or_default() += 1;
        conns.push(r);
    }
    println!("{}", serde_json::json!({ "backends": backends }));
    let _ = std::io::stdout().flush();
    for line in std::io::stdin().lock().lines() {
        if line.map(|l| l.trim() != "check").unwrap_or(true) {
            continue;
        }
        let mut ok = 0;
        for (i, r) in conns.iter_mut().enumerate() {
            let probe = format!("probe-{i}\n");
            let mut back = String::new();
            if r.get_mut().write_all(probe.as_bytes()).is_ok()
                && r.read_line(&mut back).is_ok()
                && back == probe
            {
                ok += 1;
            }
        }
        println!("{}", serde_json::json!({ "echoed": ok, "of": conns.len() }));
        let _ = std::io::stdout().flush();
    }
}

/// The stdin lines of `send` and `http-client`, each a JSON string.
fn stdin_strings() -> impl Iterator<Item = String> {
    std::io::stdin().lock().lines().map(|line| {
        let line = line.unwrap_or_else(|e| die(&format!("stdin: {e}")));
        serde_json::from_str(&line).unwrap_or_else(|e| die(&format!("bad line {line:?}: {e}")))
    })
}

/// A connected stream and a buffered reader of it.
fn split(s: TcpStream) -> (BufReader<TcpStream>, TcpStream) {
    (
        BufReader::new(s.try_clone().unwrap_or_else(|e| die(&format!("{e}")))),
        s,
    )
}

fn send(addr: SocketAddr) {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| die(&format!("connect {addr}: {e}")));
    let (mut r, mut w) = split(s);
    for bytes in stdin_strings() {
        w.write_all(bytes.as_bytes())
            .unwrap_or_else(|e| die(&format!("write: {e}")));
        let mut answer = String::new();
        r.read_line(&mut answer)
            .unwrap_or_else(|e| die(&format!("read: {e}")));
        println!("{}", answer.trim_end());
        let _ = std::io::stdout().flush();
    }
}

/// One kept-alive connection to `addr`; every stdin line is a JSON string
/// (a request) written in one write(), then one response is read
/// (Content-Length framed, or until close) and printed as
/// `{"status":N,"body":"..","peer":"ip:port","closed":bool}`; status 0 when
/// the connection closed without an answer.
fn http_client(addr: SocketAddr) {
    let timeout = Duration::from_millis(*CONNECT_TIMEOUT_MS.get().unwrap_or(&3000));
    let s = TcpStream::connect_timeout(&addr, timeout)
        .unwrap_or_else(|e| die(&format!("connect {addr}: {e}")));
    let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let (mut r, mut w) = split(s);
    for bytes in stdin_strings() {
        let _ = w.write_all(bytes.as_bytes());
        let (mut status, mut len, mut closed) = (0u16, None, false);
        let mut head = String::new();
        loop {
            let mut l = String::new();
            if r.read_line(&mut l).unwrap_or(0) == 0 {
                closed = true;
                break;
            }
            if head.is_empty() {
                status = l
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
            }
            head.push_str(&l);
            let lower = l.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse::<usize>().ok();
            }
            if l == "\r\n" {
                break;
            }
        }
        let mut body = vec![0u8; len.unwrap_or(0)];
        if !closed && r.read_exact(&mut body).is_err() {
            closed = true;
        }
        println!(
            "{}",
            serde_json::json!({"status": status, "body": String::from_utf8_lossy(&body), "peer": peer, "closed": closed, "head": head})
        );
        let _ = std::io::stdout().flush();
    }
}

fn http(body: &'static str, addrs: &[String]) {
    let mut threads = Vec::new();
    for a in addrs {
        let addr = parse_addr(a);
        let l = TcpListener::bind(addr).unwrap_or_else(|e| die(&format!("bind {addr}: {e}")));
        // std listens with a backlog of 128; 1,024 clients connecting at
        // once would overflow it and see SYN retries. listen(2) again on a
        // listening socket only changes the backlog (capped by somaxconn).
        // SAFETY: `l` owns a valid listening socket fd.
        if unsafe { libc::listen(l.as_raw_fd(), 4096) } != 0 {
            die(&format!(
                "listen {addr}: {}",
                std::io::Error::last_os_error()
            ));
        }
        threads.push(std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                // A failed spawn (thread limit) drops this connection only.
                let _ = std::thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(move || http_conn(s, body));
            }
        }));
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
}

/// Serves requests on one connection until the client closes it or asks
/// for `Connection: close`. Requests are expected without a body (GET);
/// pipelined requests are answered in order.
fn http_conn(mut s: TcpStream, body: &str) {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n",
        body.len()
    );
    let ok = format!("{head}\r\n{body}");
    let ok_close = format!("{head}Connection: close\r\n\r\n{body}");
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 8192];
    let mut have = 0;
    loop {
        // Answer every complete request head in the buffer.
        while let Some(end) = find_head_end(&buf[..have]) {
            let close = wants_close(&buf[..end]);
            let answer = if close { &ok_close } else { &ok };
            if s.write_all(answer.as_bytes()).is_err() || close {
                return;
            }
            buf.copy_within(end..have, 0);
            have -= end;
        }
        if have == buf.len() {
            return; // a request head larger than 8 KiB: not ours to serve
        }
        match s.read(&mut buf[have..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => have += n,
        }
    }
}

fn get(addr: SocketAddr, count: usize, header: Option<&str>) {
    let mut backends: BTreeMap<String, usize> = BTreeMap::new();
    let mut error_kinds: BTreeMap<String, usize> = BTreeMap::new();
    let (mut errors, mut peer_mismatch) = (0, 0);
    let extra = header.map(|h| format!("{h}\r\n")).unwrap_or_default();
    let request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n");
    for _ in 0..count {
        let one = || -> std::io::Result<(String, bool)> {
            let timeout = Duration::from_millis(*CONNECT_TIMEOUT_MS.get().unwrap_or(&3000));
            let mut s = TcpStream::connect_timeout(&addr, timeout)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let peer_ok = s.peer_addr()? == addr;
            s.write_all(request.as_bytes())?;
            let mut resp = Vec::new();
            s.read_to_end(&mut resp)?;
            let text = String::from_utf8_lossy(&resp);
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            let status = head.split_whitespace().nth(1).unwrap_or("none");
            if status != "200" {
                return Err(std::io::Error::other(format!("status {status}")));
            }
            Ok((body.trim().to_string(), peer_ok))
        };
        match one() {
            Ok((name, peer_ok)) => {
                *backends.entry(name).or_default() += 1;
                if !peer_ok {
                    peer_mismatch += 1;
                }
            }
            Err(e) => {
                errors += 1;
                let kind = match e.kind() {
                    std::io::ErrorKind::Other => e.to_string(),
                    k => format!("{k:?}"),
                };
                *error_kinds.entry(kind).or_default() += 1;
            }
        }
    }
    println!(
        "{}",
        serde_json::json!({"backends": backends, "errors": errors, "peer_mismatch": peer_mismatch, "error_kinds": error_kinds})
    );
}

/// Length of the request head (up to and including the blank line).
fn find_head_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn wants_close(head: &[u8]) -> bool {
    String::from_utf8_lossy(head).lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("connection:") && l.contains("close")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads() {
        assert_eq!(
            find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET"),
            Some(27)
        );
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert!(wants_close(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(wants_close(b"GET / HTTP/1.1\r\nconnection: Close\r\n\r\n"));
        assert!(!wants_close(
            b"GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n"
        ));
        assert!(!wants_close(b"GET /close HTTP/1.1\r\nHost: close\r\n\r\n"));
    }
}
