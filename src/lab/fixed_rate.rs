//! An HTTP/1.1 load at a fixed rate, for latency at a fixed rate (wrk has no such mode).
//!
//! Each of `connections` keep-alive connections sends on its own schedule: one request every
//! `connections / rate` seconds, the connections offset evenly, so the whole load is `rate`
//! requests per second however fast the server answers. A request's latency counts from the
//! moment it was due when the connection was still busy with the one before (the wait the
//! server caused, as wrk2 counts it: no coordinated omission), and from its real send time
//! otherwise (so the timer's own millisecond granularity is not counted).
//!
//! Every connection is opened (TCP, and TLS when asked) before the first request is due: the
//! figure is the latency of keep-alive clients, not of a burst of handshakes at the start. A
//! connection that fails later is opened again within its schedule, and that time counts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;

/// The longest latency recorded (longer ones are recorded as this), µs.
const MAX_LATENCY_US: u64 = 60_000_000;

/// What to send, where, and how fast.
#[derive(Clone)]
pub struct FixedRate {
    /// The server.
    pub addr: SocketAddr,
    /// TLS: the client configuration and the SNI name; `None` for plain HTTP.
    pub tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    /// `Host` headers, used in turn (request `n` of the whole load names `hosts[n % len]`).
    pub hosts: Vec<String>,
    /// The path of every request.
    pub path: String,
    /// Requests per second, over all connections.
    pub rate: u32,
    /// Keep-alive connections.
    pub connections: u32,
    /// How long requests are started for.
    pub duration: Duration,
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct FixedRateRun {
    /// Latency of every request (failed ones included), µs.
    pub latency_us: Histogram<u64>,
    /// Requests answered 2xx or 3xx.
    pub ok: u64,
    /// Requests answered with another status.
    pub non2xx: u64,
    /// Requests that failed on the connection (connect, TLS, reset, malformed answer).
    pub errors: u64,
    /// The first connection error, with its causes.
    pub first_error: Option<String>,
    /// From the first request due to the last answer.
    pub elapsed: Duration,
    /// Every request's start (ms after the first was due) and latency (µs), in no order.
    pub timeline: Vec<(u32, u32)>,
}

impl FixedRateRun {
    fn empty() -> Result<Self> {
        Ok(FixedRateRun {
            latency_us: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .context("latency histogram")?,
            ok: 0,
            non2xx: 0,
            errors: 0,
            first_error: None,
            elapsed: Duration::ZERO,
            timeline: Vec::new(),
        })
    }

    /// How the requests that took at least `threshold_us` cluster in time: how many there
    /// are, how many `window_ms` windows (by their start) hold one, and the most in one
    /// window. Late requests bunched in few windows are stalls that hit every connection at
    /// once (the server's thread or the machine paused); spread out, they are single slow
    /// requests.
    pub fn late_windows(&self, threshold_us: u64, window_ms: u32) -> (usize, usize, usize) {
        let mut per_window: std::collections::HashMap<u32, usize> = Default::default();
        let mut late = 0;
        for &(at_ms, us) in &self.timeline {
            if u64::from(us) >= threshold_us {
                late += 1;
                *per_window.entry(at_ms / window_ms.max(1)).or_default() += 1;
            }
        }
        let most = per_window.values().copied().max().unwrap_or(0);
        (late, per_window.len(), most)
    }

    /// Requests sent.
    pub fn requests(&self) -> u64 {
        self.ok + self.non2xx + self.errors
    }

    /// Requests per second achieved.
    pub fn rate(&self) -> f64 {
        self.requests() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The latency at quantile `q` (0..=1), µs.
    pub fn quantile_us(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64
    }
}

/// A TLS client configuration trusting only the certificates in PEM file `ca`, offering
/// HTTP/1.1 by ALPN.
pub fn tls_client_config(ca: &std::path::Path) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("reading {}", ca.display()))?
    {
        let cert = cert.with_context(|| format!("a certificate in {}", ca.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("trusting the certificate in {}", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Runs the load; needs a Tokio runtime with timers and I/O. Fails only when the
/// configuration is unusable (no host, no rate); failed requests are counted, not returned.
pub async fn run(load: FixedRate) -> Result<FixedRateRun> {
    anyhow::ensure!(!load.hosts.is_empty(), "fixed-rate load without a host");
    anyhow::ensure!(
        load.rate > 0 && load.connections > 0,
        "fixed-rate load needs a rate and connections"
    );
    let load = Arc::new(load);
    // Open them all first, together (one that cannot be opened tries again when its first
    // request is due, and that failure is counted there).
    let opening: Vec<_> = (0..load.connections)
        .map(|_| {
            let load = load.clone();
            tokio::spawn(async move { connect(&load).await.ok() })
        })
        .collect();
    let mut senders = Vec::with_capacity(opening.len());
    for o in opening {
        senders.push(o.await.context("a load connection's task failed")?);
    }
    // A short head start, so every connection's first request is due after the tasks start.
    let start = Instant::now() + Duration::from_millis(20);
    let tasks: Vec<_> = senders
        .into_iter()
        .zip(0..)
        .map(|(sender, i)| tokio::spawn(connection(load.clone(), i, sender, start)))
        .collect();
    let mut total = FixedRateRun::empty()?;
    for t in tasks {
        let r = t.await.context("a load connection's task failed")??;
        total
            .latency_us
            .add(&r.latency_us)
            .context("merging latency histograms")?;
        total.ok += r.ok;
        total.non2xx += r.non2xx;
        total.errors += r.errors;
        total.first_error = total.first_error.or(r.first_error);
        total.timeline.extend(r.timeline);
    }
    total.elapsed = start.elapsed();
    Ok(total)
}

/// One connection's schedule: request `k` is due at `start + i / rate + k * connections /
/// rate`.
async fn connection(
    load: Arc<FixedRate>,
    i: u32,
    mut sender: Option<SendRequest<Empty<Bytes>>>,
    start: Instant,
) -> Result<FixedRateRun> {
    let mut out = FixedRateRun::empty()?;
    let rate = f64::from(load.rate);
    let offset = f64::from(i) / rate;
    let period = f64::from(load.connections) / rate;
    let end = start + load.duration;
    let mut busy_until = start;
    for k in 0u64.. {
        let due = start + Duration::from_secs_f64(offset + period * k as f64);
        if due >= end {
            break;
        }
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        let from = if busy_until > due {
            due
        } else {
            Instant::now()
        };
        let n = u64::from(i) + k * u64::from(load.connections);
        let host = &load.hosts[(n % load.hosts.len() as u64) as usize];
        match request(&load, &mut sender, host).await {
            Ok(status) if status < 400 => out.ok += 1,
            Ok(_) => out.non2xx += 1,
            Err(e) => {
                out.errors += 1;
                out.first_error.get_or_insert_with(|| format!("{e:#}"));
                sender = None;
            }
        }
        let now = Instant::now();
        let us = now.duration_since(from).as_micros();
        out.latency_us
            .saturating_record(u64::try_from(us).unwrap_or(MAX_LATENCY_US).max(1));
        let at_ms = from.saturating_duration_since(start).as_millis();
        out.timeline.push((
            u32::try_from(at_ms).unwrap_or(u32::MAX),
            u32::try_from(us).unwrap_or(u32::MAX),
        ));
        busy_until = now;
    }
    Ok(out)
}

/// One request on the connection (made first when there is none); the answer's status.
async fn request(
    load: &FixedRate,
    sender: &mut Option<SendRequest<Empty<Bytes>>>,
    host: &str,
) -> Result<u16> {
    let tx = match sender {
        Some(tx) => tx,
        None => sender.insert(connect(load).await?),
    };
    tx.ready().await.context("connection closed")?;
    let req = hyper::Request::get(load.path.as_str())
        .header(hyper::header::HOST, host)
        .body(Empty::<Bytes>::new())
        .context("request")?;
    let resp = tx.send_request(req).await.context("request failed")?;
    let status = resp.status().as_u16();
    resp.into_body()
        .collect()
        .await
        .context("reading the answer")?;
    Ok(status)
}

async fn connect(load: &FixedRate) -> Result<SendRequest<Empty<Bytes>>> {
    let tcp = tokio::net::TcpStream::connect(load.addr)
        .await
        .with_context(|| format!("connecting to {}", load.addr))?;
    tcp.set_nodelay(true).context("TCP_NODELAY")?;
    match &load.tls {
        None => handshake(tcp).await,
        Some((cfg, name)) => {
            let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                .connect(name.clone(), tcp)
                .await
                .context("TLS handshake")?;
            handshake(tls).await
        }
    }
}

async fn handshake<S>(io: S) -> Result<SendRequest<Empty<Bytes>>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .context("HTTP/1.1 handshake")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a tiny server on loopback: the rate is kept, and every request is answered.
    #[test]
    fn keeps_the_rate_against_a_local_server() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                loop {
                    let Ok((s, _)) = listener.accept().await else {
                        return;
                    };
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(|req: hyper::Request<_>| async move {
                            let code = if req.headers()[hyper::header::HOST] == "b" {
                                404
                            } else {
                                200
                            };
                            hyper::Response::builder()
                                .status(code)
                                .body(http_body_util::Full::new(Bytes::from_static(b"ok")))
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(s), svc)
                            .await;
                    });
                }
            });
            let r = run(FixedRate {
                addr,
                tls: None,
                hosts: vec!["a".into(), "b".into()],
                path: "/".into(),
                rate: 400,
                connections: 4,
                duration: Duration::from_millis(500),
            })
            .await
            .unwrap();
            assert_eq!(r.requests(), 200, "{r:?}");
            assert_eq!((r.ok, r.non2xx, r.errors), (100, 100, 0));
            assert_eq!(r.latency_us.len(), 200);
            assert_eq!(r.timeline.len(), 200);
        });
    }

    /// Nothing listening: every request fails on the connection and is counted, none hangs.
    #[test]
    fn counts_refused_connections() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let r = rt
            .block_on(run(FixedRate {
                addr,
                tls: None,
                hosts: vec!["a".into()],
                path: "/".into(),
                rate: 100,
                connections: 2,
                duration: Duration::from_millis(200),
            }))
            .unwrap();
        assert_eq!((r.ok, r.errors), (0, 20), "{r:?}");
    }

    #[test]
    fn late_requests_are_counted_by_window() {
        let mut r = FixedRateRun::empty().unwrap();
        // Three late requests in the window 20–29 ms, one at 95 ms, the rest fast.
        r.timeline = vec![
            (1, 100),
            (21, 5000),
            (22, 6000),
            (29, 5000),
            (30, 100),
            (95, 7000),
        ];
        assert_eq!(r.late_windows(5000, 10), (4, 2, 3));
        assert_eq!(r.late_windows(8000, 10), (0, 0, 0));
    }
}
