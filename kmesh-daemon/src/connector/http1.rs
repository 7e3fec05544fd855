//! HTTP/1.1 message framing for the connector: read a head, tell how its
//! body is delimited, and relay a body byte for byte (chunked bodies are
//! relayed with their framing, trailers included).
//!
//! Memory per connection: one buffer of [`BUF`] bytes; a head longer than
//! [`MAX_HEAD`] is refused. Backpressure: a body is relayed by reading no
//! more than the destination has accepted (`write_all` before the next read).

use std::io;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Read buffer per side of a connection.
pub const BUF: usize = 16 * 1024;
/// Longest request or response head accepted (Envoy's default is 60 KiB).
pub const MAX_HEAD: usize = 60 * 1024;
/// Headers per message.
const MAX_HEADERS: usize = 100;

/// One side of a relayed connection with its read buffer.
pub struct Peer {
    pub stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
}

/// How a message body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    /// A response without length: the body ends when the upstream closes.
    UntilClose,
}

/// A parsed request head (the raw bytes are relayed unchanged).
#[derive(Debug)]
pub struct RequestHead {
    pub method: String,
    /// Origin-form target as sent.
    pub target: String,
    /// In arrival order.
    pub headers: Vec<(String, String)>,
    /// HTTP/1.0, or `Connection: close`.
    pub close: bool,
    pub framing: Framing,
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: u16,
    pub close: bool,
    pub headers: Vec<(String, String)>,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn headers_of(h: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    h.iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).trim().to_string(),
            )
        })
        .collect()
}

fn has_token(headers: &[(String, String)], name: &str, token: &str) -> bool {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .flat_map(|(_, v)| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Body framing from `Transfer-Encoding` / `Content-Length` (RFC 9112 §6.3:
/// chunked wins; conflicting lengths are an error).
fn body_framing(headers: &[(String, String)]) -> io::Result<Option<Framing>> {
    if has_token(headers, "transfer-encoding", "chunked") {
        return Ok(Some(Framing::Chunked));
    }
    let mut len = None;
    for (_, v) in headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        let n: u64 = v
            .parse()
            .map_err(|_| invalid(format!("bad content-length {v:?}")))?;
        if len.is_some_and(|l| l != n) {
            return Err(invalid("conflicting content-length headers"));
        }
        len = Some(n);
    }
    Ok(len.map(Framing::Length))
}

pub fn parse_request(head: &[u8]) -> io::Result<RequestHead> {
    let mut h = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut h);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(invalid("incomplete request head")),
        Err(e) => return Err(invalid(format!("malformed request head: {e}"))),
    }
    let headers = headers_of(req.headers);
    let http10 = req.version == Some(0);
    Ok(RequestHead {
        method: req.method.unwrap_or_default().to_string(),
        target: req.path.unwrap_or_default().to_string(),
        close: if http10 {
            !has_token(&headers, "connection", "keep-alive")
        } else {
            has_token(&headers, "connection", "close")
        },
        framing: body_framing(&headers)?.unwrap_or(Framing::None),
        headers,
    })
}

pub fn parse_response(head: &[u8]) -> io::Result<ResponseHead> {
    let mut h = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut h);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(invalid("incomplete response head")),
        Err(e) => return Err(invalid(format!("malformed response head: {e}"))),
    }
    let headers = headers_of(resp.headers);
    Ok(ResponseHead {
        status: resp.code.unwrap_or(0),
        close: resp.version == Some(0) || has_token(&headers, "connection", "close"),
        headers,
    })
}

impl ResponseHead {
    /// RFC 9112 §6.3: no body for HEAD, 1xx, 204 and 304.
    pub fn framing(&self, method: &str) -> io::Result<Framing> {
        if method.eq_ignore_ascii_case("HEAD")
            || (100..200).contains(&self.status)
            || self.status == 204
            || self.status == 304
        {
            return Ok(Framing::None);
        }
        Ok(body_framing(&self.headers)?.unwrap_or(Framing::UntilClose))
    }
}

impl Peer {
    pub fn new(stream: TcpStream) -> Peer {
        let _ = stream.set_nodelay(true);
        Peer {
            stream,
            buf: vec![0; BUF],
            pos: 0,
            end: 0,
        }
    }

    /// Bytes read but not consumed yet.
    pub fn buffered(&self) -> usize {
        self.end - self.pos
    }

    /// Reads more bytes after the buffered ones; 0 at EOF.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        if self.end == self.buf.len() {
            if self.buf.len() >= MAX_HEAD {
                return Err(invalid("head larger than MAX_HEAD"));
            }
            self.buf.resize((self.buf.len() * 2).min(MAX_HEAD), 0);
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// The next head (up to and including the blank line), or `None` on
    /// EOF before its first byte.
    pub async fn read_head(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut scanned = 0usize;
        loop {
            let have = &self.buf[self.pos..self.end];
            if let Some(i) = have[scanned.saturating_sub(3)..]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
            {
                let n = scanned.saturating_sub(3) + i + 4;
                let head = have[..n].to_vec();
                self.pos += n;
                return Ok(Some(head));
            }
            scanned = have.len();
            if self.fill().await? == 0 {
                return if self.buffered() == 0 {
                    Ok(None)
                } else {
                    Err(io::Error::from(io::ErrorKind::UnexpectedEof))
                };
            }
        }
    }

    /// Moves `n` bytes to `dst`.
    async fn relay_exact<W: AsyncWrite + Unpin>(
        &mut self,
        mut n: u64,
        dst: &mut W,
    ) -> io::Result<()> {
        while n > 0 {
            if self.buffered() == 0 && self.fill().await? == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            let k = (self.buffered() as u64).min(n) as usize;
            dst.write_all(&self.buf[self.pos..self.pos + k]).await?;
            self.pos += k;
            n -= k as u64;
        }
        Ok(())
    }

    /// One CRLF-terminated line, relayed; returns it.
    async fn relay_line<W: AsyncWrite + Unpin>(&mut self, dst: &mut W) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buf[self.pos..self.end]
                .windows(2)
                .position(|w| w == b"\r\n")
            {
                let line = self.buf[self.pos..self.pos + i + 2].to_vec();
                dst.write_all(&line).await?;
                self.pos += i + 2;
                return Ok(line);
            }
            if self.fill().await? == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
        }
    }

    /// Relays a body framed as `framing` to `dst`.
    pub async fn relay_body<W: AsyncWrite + Unpin>(
        &mut self,
        framing: Framing,
        dst: &mut W,
    ) -> io::Result<()> {
        match framing {
            Framing::None => Ok(()),
            Framing::Length(n) => self.relay_exact(n, dst).await,
            Framing::Chunked => loop {
                let line = self.relay_line(dst).await?;
                let size = std::str::from_utf8(&line)
                    .ok()
                    .and_then(|l| l.trim_end().split(';').next())
                    .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
                    .ok_or_else(|| invalid("bad chunk size line"))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    while self.relay_line(dst).await?.len() > 2 {}
                    return Ok(());
                }
                self.relay_exact(size + 2, dst).await?;
            },
            Framing::UntilClose => {
                loop {
                    if self.buffered() > 0 {
                        dst.write_all(&self.buf[self.pos..self.end]).await?;
                        self.pos = self.end;
                    }
                    if self.fill().await? == 0 {
                        break;
                    }
                }
                Ok(())
            }
        }
    }
}

/// Envoy's answer when no route matches (404) or the cluster has no
/// healthy endpoint (503): empty body, with `server: kmesh`.
pub fn local_reply(status: u16, close: bool) -> Vec<u8> {
    let reason = match status {
        404 => "Not Found",
        400 => "Bad Request",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        _ => "Service Unavailable",
    };
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let conn = if close { "connection: close\r\n" } else { "" };
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\ndate: {date}\r\nserver: kmesh\r\n{conn}\r\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing() {
        let r =
            parse_request(b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n").unwrap();
        assert_eq!(
            (r.target.as_str(), r.framing, r.close),
            ("/a?b=1", Framing::Length(5), false)
        );
        let r = parse_request(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.framing, r.close), (Framing::Chunked, true));
        assert!(parse_request(b"GET / HTTP/1.0\r\n\r\n").unwrap().close);
        assert!(
            parse_request(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
                .is_err()
        );
        let resp = parse_response(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        assert_eq!(resp.framing("GET").unwrap(), Framing::UntilClose);
        assert_eq!(resp.framing("HEAD").unwrap(), Framing::None);
        let resp =
            parse_response(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n").unwrap();
        assert_eq!(resp.framing("GET").unwrap(), Framing::None);
    }

    /// A peer reading what `bytes` are, and the relay of one body framed
    /// `f` from it; returns (relayed, what stays buffered for the next head).
    async fn relay(bytes: &'static [u8], f: Framing) -> (Vec<u8>, Vec<u8>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let w = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            // In pieces, as a network may deliver them.
            for c in bytes.chunks(3) {
                s.write_all(c).await.unwrap();
                s.flush().await.unwrap();
            }
        });
        let mut p = Peer::new(l.accept().await.unwrap().0);
        let mut out = Vec::new();
        p.relay_body(f, &mut out).await.unwrap();
        w.await.unwrap();
        let mut rest = Vec::new();
        p.relay_body(Framing::UntilClose, &mut rest).await.unwrap();
        (out, rest)
    }

    #[tokio::test]
    async fn bodies_are_relayed_exactly_and_stop_at_their_end() {
        let (b, rest) = relay(b"hello worldGET /", Framing::Length(11)).await;
        assert_eq!((&b[..], &rest[..]), (&b"hello world"[..], &b"GET /"[..]));
        let chunked: &[u8] = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        let (b, rest) = relay(chunked, Framing::Chunked).await;
        assert_eq!(b, &chunked[..chunked.len() - 4]);
        assert_eq!(rest, b"NEXT");
        let (b, _) = relay(b"until the end", Framing::UntilClose).await;
        assert_eq!(b, b"until the end");
    }

    #[tokio::test]
    async fn heads_are_split_at_the_blank_line() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
                .await
                .unwrap();
        });
        let mut p = Peer::new(l.accept().await.unwrap().0);
        let a = p.read_head().await.unwrap().unwrap();
        assert_eq!(parse_request(&a).unwrap().target, "/a");
        let b = p.read_head().await.unwrap().unwrap();
        assert_eq!(parse_request(&b).unwrap().target, "/b");
        assert!(p.read_head().await.unwrap().is_none(), "EOF between heads");
    }

    #[test]
    fn local_reply_is_envoy_shaped() {
        let r = String::from_utf8(local_reply(404, false)).unwrap();
        assert!(r.starts_with("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\ndate: "));
        assert!(r.ends_with("server: kmesh\r\n\r\n"));
    }
}
