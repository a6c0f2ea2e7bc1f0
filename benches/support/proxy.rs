//! A counting proxy for the Docker socket: drover is started with
//! `DOCKER_HOST` pointing at it, and every HTTP request it makes to the
//! engine is logged (time, method, path template, and when the answer's head
//! came back) while the bytes pass through unchanged.
//!
//! It frames HTTP/1.1 in both directions (content length, chunked bodies,
//! bodies that last until the connection closes, upgrades), so requests on a
//! kept-alive connection are each counted once, and streamed answers (events,
//! stats) are followed for as long as they last.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// One request seen by the proxy.
#[derive(Clone, Debug)]
pub struct Call {
    pub at: Instant,
    /// `GET /containers/json`, with ids, names and the API version replaced.
    pub endpoint: String,
    /// When the head of the engine's answer came back.
    pub answered: Option<Instant>,
}

#[derive(Default)]
pub struct CallLog {
    calls: Mutex<Vec<Call>>,
}

impl CallLog {
    /// Calls made at or after `since` (and before `until`, when given).
    pub fn between(&self, since: Instant, until: Option<Instant>) -> Vec<Call> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.at >= since && until.is_none_or(|u| c.at < u))
            .cloned()
            .collect()
    }

    fn push(&self, endpoint: String) -> usize {
        let mut calls = self.calls.lock().unwrap();
        calls.push(Call {
            at: Instant::now(),
            endpoint,
            answered: None,
        });
        calls.len() - 1
    }

    fn answered(&self, index: usize) {
        if let Some(call) = self.calls.lock().unwrap().get_mut(index) {
            call.answered = Some(Instant::now());
        }
    }
}

pub struct Proxy {
    pub socket: PathBuf,
    pub log: Arc<CallLog>,
}

impl Proxy {
    /// Listens on `socket` and forwards every connection to `upstream`.
    pub fn start(socket: &Path, upstream: &Path) -> std::io::Result<Proxy> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        let log = Arc::new(CallLog::default());
        let upstream = upstream.to_path_buf();
        let accept_log = log.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let log = accept_log.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if let Ok(server) = UnixStream::connect(&upstream).await {
                        relay(client, server, log).await;
                    }
                });
            }
        });
        Ok(Proxy {
            socket: socket.to_path_buf(),
            log,
        })
    }

    /// The `DOCKER_HOST` value that points at this proxy.
    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

/// Requests waiting for their answer on one connection: log index and method.
type Pending = Arc<Mutex<VecDeque<(usize, String)>>>;

async fn relay(client: UnixStream, server: UnixStream, log: Arc<CallLog>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let pending: Pending = Arc::default();
    let requests = {
        let pending = pending.clone();
        let log = log.clone();
        async move {
            let mut framer = Framer::default();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match client_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                framer.feed(&buf[..n], &mut |head| {
                    let text = String::from_utf8_lossy(head);
                    let mut words = text.split_whitespace();
                    let method = words.next().unwrap_or("").to_string();
                    let path = words.next().unwrap_or("");
                    let index = log.push(format!("{method} {}", template(path)));
                    pending.lock().unwrap().push_back((index, method));
                    request_body(&text)
                });
                if server_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = server_write.shutdown().await;
        }
    };
    let answers = async move {
        let mut framer = Framer::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            framer.feed(&buf[..n], &mut |head| {
                let text = String::from_utf8_lossy(head);
                let status: u16 = text
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                if (100..200).contains(&status) && status != 101 {
                    return Body::None; // an interim answer; the real one follows
                }
                let request = pending.lock().unwrap().pop_front();
                let method = match request {
                    Some((index, method)) => {
                        log.answered(index);
                        method
                    }
                    None => String::new(),
                };
                response_body(&text, status, &method)
            });
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = client_write.shutdown().await;
    };
    tokio::join!(requests, answers);
}

/// How the body after a head is delimited.
enum Body {
    None,
    Length(u64),
    Chunked,
    UntilClose,
    /// An upgraded connection: no more HTTP to frame.
    Opaque,
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

fn framing(head: &str) -> Option<Body> {
    if header(head, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        return Some(Body::Chunked);
    }
    header(head, "content-length")
        .and_then(|v| v.parse().ok())
        .map(Body::Length)
}

fn request_body(head: &str) -> Body {
    if header(head, "upgrade").is_some() {
        return Body::Opaque;
    }
    framing(head).unwrap_or(Body::None)
}

fn response_body(head: &str, status: u16, method: &str) -> Body {
    if status == 101 {
        return Body::Opaque;
    }
    if method == "HEAD" || status == 204 || status == 304 {
        return Body::None;
    }
    framing(head).unwrap_or(Body::UntilClose)
}

enum State {
    Head(Vec<u8>),
    Fixed(u64),
    ChunkSize(Vec<u8>),
    ChunkData(u64),
    Trailer(Vec<u8>),
    Done,
}

/// Finds message heads in one direction of an HTTP/1.1 connection.
struct Framer {
    state: State,
}

impl Default for Framer {
    fn default() -> Self {
        Self {
            state: State::Head(Vec::new()),
        }
    }
}

impl Framer {
    fn feed(&mut self, mut data: &[u8], on_head: &mut dyn FnMut(&[u8]) -> Body) {
        while !data.is_empty() {
            match &mut self.state {
                State::Head(buf) => {
                    if take_until(buf, &mut data, b"\r\n\r\n").is_none() {
                        continue;
                    }
                    let head = std::mem::take(buf);
                    self.state = match on_head(&head) {
                        Body::None | Body::Length(0) => State::Head(Vec::new()),
                        Body::Length(n) => State::Fixed(n),
                        Body::Chunked => State::ChunkSize(Vec::new()),
                        Body::UntilClose | Body::Opaque => State::Done,
                    };
                }
                State::Fixed(left) => {
                    let n = (*left).min(data.len() as u64);
                    data = &data[n as usize..];
                    *left -= n;
                    if *left == 0 {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::ChunkSize(buf) => {
                    if take_until(buf, &mut data, b"\r\n").is_none() {
                        continue;
                    }
                    let line = String::from_utf8_lossy(buf);
                    let size = u64::from_str_radix(line.trim().split(';').next().unwrap_or("").trim(), 16)
                        .unwrap_or(0);
                    self.state = if size == 0 {
                        State::Trailer(Vec::new())
                    } else {
                        State::ChunkData(size + 2)
                    };
                }
                State::ChunkData(left) => {
                    let n = (*left).min(data.len() as u64);
                    data = &data[n as usize..];
                    *left -= n;
                    if *left == 0 {
                        self.state = State::ChunkSize(Vec::new());
                    }
                }
                State::Trailer(buf) => {
                    if take_until(buf, &mut data, b"\r\n").is_none() {
                        continue;
                    }
                    // An empty line ends the trailer; any other line is a trailer field.
                    if buf.as_slice() == b"\r\n" || buf.ends_with(b"\r\n\r\n") {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::Done => return,
            }
        }
    }
}

/// Moves bytes from `data` into `buf` until `buf` ends with `end` (returns
/// `Some`) or `data` is exhausted (returns `None`).
fn take_until(buf: &mut Vec<u8>, data: &mut &[u8], end: &[u8]) -> Option<()> {
    while let Some((&byte, rest)) = data.split_first() {
        buf.push(byte);
        *data = rest;
        if buf.ends_with(end) {
            return Some(());
        }
    }
    None
}

/// The endpoint of a request path: no query, no API version, ids and image
/// names replaced (`/containers/{id}/json`, `/images/{name}/json`).
pub fn template(path: &str) -> String {
    let path = path.split('?').next().unwrap_or("");
    let mut segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if segments
        .first()
        .is_some_and(|s| s.starts_with('v') && s[1..].chars().all(|c| c.is_ascii_digit() || c == '.'))
    {
        segments.remove(0);
    }
    let fixed = ["json", "create", "prune"];
    match segments.as_slice() {
        ["containers", id, rest @ ..] if !fixed.contains(id) => {
            let mut out = String::from("/containers/{id}");
            for r in rest {
                out.push('/');
                out.push_str(r);
            }
            out
        }
        ["images", first, .., "json"] if !fixed.contains(first) => "/images/{name}/json".into(),
        ["exec", _, rest @ ..] => format!("/exec/{{id}}/{}", rest.join("/")),
        _ => format!("/{}", segments.join("/")),
    }
}
