//! A small, fast HTTP/1.1 backend for tests and benchmarks, run inside a lab namespace, and
//! the WebSocket pieces (RFC 6455) its `/ws` echo and the test client share.
//!
//! What it answers (`NAME` is the backend's name):
//!
//! - `GET /`: an HTML page whose script is loaded by the *relative* URL `m.js`, the case where
//!   an ingress that routes by path prefix breaks a page (the browser asks for `/m.js`, not
//!   `/app/m.js`);
//! - `GET /m.js`: the script, which adds `<p id="loaded">loaded NAME</p>` once the document is
//!   parsed (also when it runs after `DOMContentLoaded`);
//! - `/echo…` (any method): the request as the backend saw it, as text (name, method, path
//!   and query, body size, every header lowercased);
//! - `/ws` (and `/ws/…`) with `Upgrade: websocket`: a WebSocket echo (text, binary and
//!   continuation frames sent back as they came, ping answered with pong, close with close);
//!   without the upgrade headers, `426 Upgrade Required`;
//! - `GET /slow/MS`: `NAME\n` after MS milliseconds (at most 10,000), for requests that stay
//!   in flight;
//! - anything else: `200`, `NAME\n` (the benchmarks' small response).
//!
//! hyper's HTTP/1 server (with upgrades) on a current-thread tokio runtime on a thread of its
//! own that entered the namespace, so the listening socket and every connection live there;
//! one thread per backend keeps four of them from crowding two cores.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderMap, HeaderValue, UPGRADE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::lab::in_netns;

/// The GUID RFC 6455 appends to the client's `Sec-WebSocket-Key` before hashing it.
pub const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Largest WebSocket frame payload the echo server and the client accept (larger: the server
/// closes with 1009, the client fails).
pub const MAX_FRAME_PAYLOAD: usize = 16 << 20;

/// Longest backend name (it is written into HTML and JavaScript unescaped, so it is limited
/// to characters that need no escaping there).
pub const MAX_NAME_LEN: usize = 63;

/// Starts the backend in netns `ns` on 0.0.0.0:`port`; serves until the process exits. `name`
/// identifies it in responses (letters, digits, `-`, `_`, `.`; at most [`MAX_NAME_LEN`]).
/// Returns once it listens.
pub fn start_http_backend(ns: &str, port: u16, name: &str) -> Result<()> {
    check_name(name)?;
    let pages = Arc::new(Pages::new(name));
    let (tx, rx) = std::sync::mpsc::channel();
    let thread_ns = ns.to_string();
    std::thread::Builder::new()
        .name(format!("http-backend-{name}"))
        .spawn(move || {
            let _ = in_netns(&thread_ns, move || serve(port, pages, tx));
        })
        .context("starting the HTTP backend's thread")?;
    rx.recv_timeout(Duration::from_secs(10))
        .with_context(|| format!("HTTP backend {name} in {ns} did not start within 10 s"))?
        .map_err(|e| anyhow!("HTTP backend {name} in {ns} on port {port}: {e}"))
}

/// Refuses names that would need escaping in the page or the script.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        bail!("HTTP backend name {name:?}: use 1-{MAX_NAME_LEN} letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

/// The fixed responses, made once.
struct Pages {
    name: String,
    html: Bytes,
    js: Bytes,
    small: Bytes,
}

impl Pages {
    fn new(name: &str) -> Pages {
        Pages {
            name: name.to_string(),
            html: Bytes::from(page_html(name)),
            js: Bytes::from(page_script(name)),
            small: Bytes::from(format!("{name}\n")),
        }
    }
}

/// The page `GET /` answers: its script is the relative URL `m.js`.
pub fn page_html(name: &str) -> String {
    format!(
        "<!doctype html><html><head><title>{name}</title><script src=\"m.js\"></script></head>\
         <body><p id=\"name\">{name}</p></body></html>"
    )
}

/// The script `GET /m.js` answers: adds `<p id="loaded">loaded NAME</p>` to the body once the
/// document is parsed, or at once when that already happened.
pub fn page_script(name: &str) -> String {
    format!(
        "(function(){{function f(){{var p=document.createElement(\"p\");p.id=\"loaded\";\
         p.textContent=\"loaded {name}\";document.body.appendChild(p);}}\
         if(document.readyState===\"loading\"){{document.addEventListener(\"DOMContentLoaded\",f);}}\
         else{{f();}}}})();"
    )
}

/// The backend thread: binds, reports, then serves forever.
fn serve(port: u16, pages: Arc<Pages>, ready: Sender<Result<(), String>>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("starting its runtime: {e}")));
            return;
        }
    };
    let listener = match rt.block_on(tokio::net::TcpListener::bind(("0.0.0.0", port))) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(format!("binding 0.0.0.0:{port}: {e}")));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    rt.block_on(accept_loop(listener, pages));
}

async fn accept_loop(listener: tokio::net::TcpListener, pages: Arc<Pages>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            // Out of descriptors and the like: wait a little rather than spin.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let pages = pages.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| respond(req, pages.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

type Resp = Response<Full<Bytes>>;

fn response(status: StatusCode, content_type: &'static str, body: Bytes) -> Resp {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

async fn respond(req: Request<Incoming>, pages: Arc<Pages>) -> Result<Resp, Infallible> {
    let path = req.uri().path();
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    let r = if path == "/ws" || path.starts_with("/ws/") {
        websocket(req, &pages.name)
    } else if path.starts_with("/echo") {
        echo(req, &pages.name).await
    } else if get && path == "/" {
        response(StatusCode::OK, "text/html", pages.html.clone())
    } else if get && path == "/m.js" {
        response(StatusCode::OK, "application/javascript", pages.js.clone())
    } else if let Some(ms) = path.strip_prefix("/slow/").filter(|_| get) {
        let ms = ms.parse::<u64>().unwrap_or(0).min(10_000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        response(StatusCode::OK, "text/plain", pages.small.clone())
    } else {
        response(StatusCode::OK, "text/plain", pages.small.clone())
    };
    Ok(r)
}

/// `/echo`: the request as text; the body is read to its end and counted.
async fn echo(req: Request<Incoming>, name: &str) -> Resp {
    let (parts, mut body) = req.into_parts();
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => bytes += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(e) => {
                let text = format!("name={name}\nerror=reading the body: {e}\n");
                return response(StatusCode::BAD_REQUEST, "text/plain", Bytes::from(text));
            }
        }
    }
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut text = format!(
        "name={name}\nmethod={}\npath={path}\nbody-bytes={bytes}\n",
        parts.method
    );
    for (k, v) in &parts.headers {
        text.push_str(k.as_str());
        text.push_str(": ");
        text.push_str(&String::from_utf8_lossy(v.as_bytes()));
        text.push('\n');
    }
    response(StatusCode::OK, "text/plain", Bytes::from(text))
}

/// Whether header `name` holds `token` in its comma list (case-insensitive).
fn has_token(headers: &HeaderMap, name: hyper::header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// `/ws`: the handshake's answer; the echo runs on the upgraded connection once hyper hands
/// it over.
fn websocket(mut req: Request<Incoming>, name: &str) -> Resp {
    let text = |s: String| Bytes::from(s);
    let h = req.headers();
    if !has_token(h, CONNECTION, "upgrade") || !has_token(h, UPGRADE, "websocket") {
        let mut r = response(
            StatusCode::UPGRADE_REQUIRED,
            "text/plain",
            text(format!(
                "{name}: {} wants Connection: upgrade and Upgrade: websocket\n",
                req.uri().path()
            )),
        );
        r.headers_mut()
            .insert(UPGRADE, HeaderValue::from_static("websocket"));
        return r;
    }
    if h.get("sec-websocket-version").map(HeaderValue::as_bytes) != Some(b"13") {
        let mut r = response(
            StatusCode::BAD_REQUEST,
            "text/plain",
            text(format!("{name}: Sec-WebSocket-Version must be 13\n")),
        );
        r.headers_mut()
            .insert("sec-websocket-version", HeaderValue::from_static("13"));
        return r;
    }
    let Some(key) = h
        .get("sec-websocket-key")
        .and_then(|k| k.to_str().ok())
        .map(str::trim)
    else {
        return response(
            StatusCode::BAD_REQUEST,
            "text/plain",
            text(format!("{name}: no Sec-WebSocket-Key\n")),
        );
    };
    let Ok(accept) = HeaderValue::from_str(&accept_key(key)) else {
        return response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            Bytes::new(),
        );
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            let _ = ws_echo(TokioIo::new(upgraded)).await;
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let hs = r.headers_mut();
    hs.insert(UPGRADE, HeaderValue::from_static("websocket"));
    hs.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    hs.insert("sec-websocket-accept", accept);
    r
}

/// The echo on an upgraded connection: frames back as they came (unmasked), ping → pong,
/// close → close with the same status code; a protocol error closes with 1002 (1009 for a
/// frame over [`MAX_FRAME_PAYLOAD`]).
async fn ws_echo<S: AsyncRead + AsyncWrite + Unpin>(mut io: S) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 16 << 10];
    loop {
        while let Some((frame, used)) = match decode_frame(&buf, MAX_FRAME_PAYLOAD) {
            Ok(f) => f,
            Err(e) => {
                let code: u16 = if matches!(e, FrameError::TooLarge { .. }) {
                    1009
                } else {
                    1002
                };
                return close(&mut io, &code.to_be_bytes()).await;
            }
        } {
            buf.drain(..used);
            if !frame.masked {
                // RFC 6455 5.1: a server closes on an unmasked client frame.
                return close(&mut io, &1002u16.to_be_bytes()).await;
            }
            match frame.opcode {
                Opcode::Text | Opcode::Binary | Opcode::Continuation => {
                    io.write_all(&encode_frame(frame.fin, frame.opcode, &frame.payload, None))
                        .await?;
                }
                Opcode::Ping => {
                    io.write_all(&encode_frame(true, Opcode::Pong, &frame.payload, None))
                        .await?;
                }
                Opcode::Pong => {}
                Opcode::Close => {
                    let code = frame.payload.get(..2).unwrap_or(&[]);
                    return close(&mut io, code).await;
                }
            }
        }
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn close<S: AsyncWrite + Unpin>(io: &mut S, payload: &[u8]) -> std::io::Result<()> {
    io.write_all(&encode_frame(true, Opcode::Close, payload, None))
        .await?;
    io.shutdown().await
}

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`: base64(SHA-1(key + GUID)).
pub fn accept_key(key: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(WS_GUID.as_bytes());
    base64(ctx.finish().as_ref())
}

/// Standard base64 (RFC 4648, with padding).
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A WebSocket frame's opcode (RFC 6455 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// 0: the continuation of a fragmented message.
    Continuation,
    /// 1: UTF-8 text.
    Text,
    /// 2: binary data.
    Binary,
    /// 8: close (payload: optional 2-byte status code, then a reason).
    Close,
    /// 9: ping.
    Ping,
    /// 10: pong.
    Pong,
}

impl Opcode {
    /// The opcode's number.
    pub fn number(self) -> u8 {
        match self {
            Opcode::Continuation => 0,
            Opcode::Text => 1,
            Opcode::Binary => 2,
            Opcode::Close => 8,
            Opcode::Ping => 9,
            Opcode::Pong => 10,
        }
    }

    /// The opcode numbered `n`, if RFC 6455 defines one.
    pub fn from_number(n: u8) -> Option<Opcode> {
        Some(match n {
            0 => Opcode::Continuation,
            1 => Opcode::Text,
            2 => Opcode::Binary,
            8 => Opcode::Close,
            9 => Opcode::Ping,
            10 => Opcode::Pong,
            _ => return None,
        })
    }

    /// Whether this is a control frame (close, ping, pong: at most 125 bytes, never
    /// fragmented).
    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// One decoded WebSocket frame (payload unmasked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The FIN bit: the last frame of a message.
    pub fin: bool,
    /// The opcode.
    pub opcode: Opcode,
    /// Whether the frame came masked (every client frame must be).
    pub masked: bool,
    /// The payload, unmasked.
    pub payload: Vec<u8>,
}

/// Why bytes are not a WebSocket frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// RSV1-3 set (no extension was negotiated).
    #[error("reserved bits {0:#x} are set")]
    ReservedBits(u8),
    /// An opcode RFC 6455 leaves reserved.
    #[error("opcode {0} is reserved")]
    UnknownOpcode(u8),
    /// A control frame fragmented or longer than 125 bytes.
    #[error("control frame {opcode:?} of {len} bytes (fin {fin}): at most 125, never fragmented")]
    BadControl {
        /// The opcode.
        opcode: Opcode,
        /// The payload length.
        len: u64,
        /// The FIN bit.
        fin: bool,
    },
    /// A payload over the reader's limit.
    #[error("payload of {len} bytes is over the limit of {max}")]
    TooLarge {
        /// The payload length the header announces.
        len: u64,
        /// The limit.
        max: usize,
    },
}

/// Encodes one frame; with `mask` (as a client must) the payload is masked with it.
pub fn encode_frame(fin: bool, opcode: Opcode, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(if fin { 0x80 } else { 0 } | opcode.number());
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.push(mask_bit | n as u8),
        n @ 126..=0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(m) => {
            out.extend_from_slice(&m);
            out.extend(payload.iter().zip(m.iter().cycle()).map(|(b, k)| b ^ k));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// Decodes the frame at the start of `buf`: `Ok(None)` while it is incomplete, else the frame
/// and the bytes it took. Payloads over `max_payload` are refused from the header alone.
pub fn decode_frame(buf: &[u8], max_payload: usize) -> Result<Option<(Frame, usize)>, FrameError> {
    let [b0, b1, rest @ ..] = buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(FrameError::ReservedBits(b0 & 0x70));
    }
    let opcode = Opcode::from_number(b0 & 0x0f).ok_or(FrameError::UnknownOpcode(b0 & 0x0f))?;
    let fin = b0 & 0x80 != 0;
    let masked = b1 & 0x80 != 0;
    let (len, rest) = match b1 & 0x7f {
        126 => match rest {
            [a, b, r @ ..] => (u64::from(u16::from_be_bytes([*a, *b])), r),
            _ => return Ok(None),
        },
        127 => match rest.split_first_chunk::<8>() {
            Some((l, r)) => (u64::from_be_bytes(*l), r),
            None => return Ok(None),
        },
        n => (u64::from(n), rest),
    };
    if opcode.is_control() && (!fin || len > 125) {
        return Err(FrameError::BadControl { opcode, len, fin });
    }
    if len > max_payload as u64 {
        return Err(FrameError::TooLarge {
            len,
            max: max_payload,
        });
    }
    let (mask, rest) = if masked {
        match rest.split_first_chunk::<4>() {
            Some((m, r)) => (Some(*m), r),
            None => return Ok(None),
        }
    } else {
        (None, rest)
    };
    // len <= max_payload, a usize.
    let len = len as usize;
    let Some(data) = rest.get(..len) else {
        return Ok(None);
    };
    let payload = match mask {
        Some(m) => data
            .iter()
            .zip(m.iter().cycle())
            .map(|(b, k)| b ^ k)
            .collect(),
        None => data.to_vec(),
    };
    let used = buf.len() - rest.len() + len;
    Ok(Some((
        Frame {
            fin,
            opcode,
            masked,
            payload,
        },
        used,
    )))
}

/// From netns `ns`: opens a TCP connection to `addr`, does a WebSocket handshake for
/// `ws://{host}{path}` (Host header `host`), sends one masked text frame `msg`, returns the
/// text of the first frame that comes back; everything bounded by `timeout`.
pub fn websocket_echo(
    ns: &str,
    addr: SocketAddr,
    host: &str,
    path: &str,
    msg: &str,
    timeout: Duration,
) -> Result<String> {
    let (host, path, msg) = (host.to_string(), path.to_string(), msg.to_string());
    in_netns(ns, move || ws_exchange(addr, &host, &path, &msg, timeout))?
        .with_context(|| format!("WebSocket echo from {ns} via {addr}"))
}

/// The time left before `deadline`, or an error once it passed.
fn left(deadline: Instant, timeout: Duration, what: &str) -> Result<Duration> {
    let d = deadline.saturating_duration_since(Instant::now());
    if d.is_zero() {
        bail!("timed out after {timeout:?} {what}");
    }
    Ok(d)
}

fn ws_exchange(
    addr: SocketAddr,
    host: &str,
    path: &str,
    msg: &str,
    timeout: Duration,
) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    let _ = s.set_nodelay(true);
    let key = base64(&rand::random::<[u8; 16]>());
    s.set_write_timeout(Some(left(deadline, timeout, "connecting")?))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .context("sending the handshake")?;
    let (head, mut buf) = read_head(&mut s, deadline, timeout)?;
    check_handshake(&head, &key)?;
    s.set_write_timeout(Some(left(deadline, timeout, "after the handshake")?))?;
    s.write_all(&encode_frame(
        true,
        Opcode::Text,
        msg.as_bytes(),
        Some(rand::random()),
    ))
    .context("sending the text frame")?;
    let mut chunk = [0u8; 4096];
    loop {
        while let Some((frame, used)) =
            decode_frame(&buf, MAX_FRAME_PAYLOAD).context("decoding the server's frame")?
        {
            buf.drain(..used);
            match frame.opcode {
                Opcode::Text => {
                    return String::from_utf8(frame.payload)
                        .context("the text frame that came back is not UTF-8");
                }
                Opcode::Ping => s.write_all(&encode_frame(
                    true,
                    Opcode::Pong,
                    &frame.payload,
                    Some(rand::random()),
                ))?,
                Opcode::Pong => {}
                Opcode::Close => bail!(
                    "the server closed the WebSocket (payload {:?})",
                    String::from_utf8_lossy(&frame.payload)
                ),
                other => bail!("the first frame that came back is {other:?}, not text"),
            }
        }
        s.set_read_timeout(Some(left(deadline, timeout, "waiting for the echo")?))?;
        let n = s.read(&mut chunk).context("waiting for the echo")?;
        if n == 0 {
            bail!("the connection closed before a frame came back");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads a response head (up to the blank line, at most 16 KiB); returns it and the bytes
/// read after it.
fn read_head(s: &mut TcpStream, deadline: Instant, timeout: Duration) -> Result<(String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            return Ok((head, buf[end + 4..].to_vec()));
        }
        if buf.len() > 16 << 10 {
            bail!("the handshake response head is over 16 KiB");
        }
        s.set_read_timeout(Some(left(deadline, timeout, "waiting for the handshake")?))?;
        let n = s
            .read(&mut chunk)
            .context("reading the handshake response")?;
        if n == 0 {
            bail!(
                "the connection closed during the handshake (got {:?})",
                String::from_utf8_lossy(&buf)
            );
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Checks a handshake response head: status 101 and the accept key that goes with `key`.
fn check_handshake(head: &str, key: &str) -> Result<()> {
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("101") {
        bail!("the handshake was answered {status:?}, not 101 (head: {head:?})");
    }
    let accept = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|(_, v)| v.trim())
        .context("the 101 response has no Sec-WebSocket-Accept")?;
    let want = accept_key(key);
    if accept != want {
        bail!("Sec-WebSocket-Accept is {accept:?}, expected {want:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
