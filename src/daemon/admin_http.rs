//! The admin HTTP server on `--metrics-addr`: `/metrics` (Prometheus text) and `/status`
//! (JSON, `api::status`).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

use crate::daemon::status::DaemonStatus;
use crate::metrics::Metrics;

/// Serves `/metrics` (Prometheus text) and `/status` (JSON for `tartanctl explain`) on `addr`
/// until the process exits.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    status: Arc<DaemonStatus>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics-addr: cannot listen on {addr}"))?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    warn!("metrics accept: {e}");
                    continue;
                }
            };
            let m = metrics.clone();
            let st = status.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let m = m.clone();
                    let st = st.clone();
                    async move {
                        if req.uri().path() == "/dns" {
                            let (code, body) = dns_lookup(&st, req.uri().query()).await;
                            Response::builder()
                                .status(code)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body)))
                        } else if req.uri().path() == "/status" {
                            let body = serde_json::to_string_pretty(&st.report().await)
                                .unwrap_or_default();
                            Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body)))
                        } else if req.uri().path() == "/metrics" {
                            Response::builder()
                                .header(
                                    "content-type",
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(Full::new(Bytes::from(m.render())))
                        } else {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"see /metrics\n")))
                        }
                    }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    debug!("metrics connection: {e}");
                }
            });
        }
    });
    Ok(())
}

/// `/dns?name=NAME&type=TYPE`: the lookup as JSON, or an error status with a one-line reason.
async fn dns_lookup(st: &DaemonStatus, query: Option<&str>) -> (StatusCode, String) {
    let mut name = None;
    let mut qtype = hickory_proto::rr::RecordType::A;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "name" => name = Some(v.into_owned()),
            "type" => match v.to_ascii_uppercase().parse() {
                Ok(t) => qtype = t,
                Err(_) => return (StatusCode::BAD_REQUEST, format!("unknown type {v:?}\n")),
            },
            _ => {}
        }
    }
    let Some(name) = name.filter(|n| !n.is_empty() && n.len() <= 255) else {
        return (
            StatusCode::BAD_REQUEST,
            "give ?name=NAME[&type=TYPE]\n".into(),
        );
    };
    match st.dns_lookup(&name, qtype).await {
        Ok(r) => (
            StatusCode::OK,
            serde_json::to_string_pretty(&r).unwrap_or_default(),
        ),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}\n")),
    }
}
