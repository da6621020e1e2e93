//! The proxy on loopback, request to answer: retries and passive health against an endpoint
//! that refuses connections and one that drops requests it read. Endpoints are loopback
//! addresses (127.0.0.2 and up) sharing one port, as a service's pods share a target port.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::AtomicUsize;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::ingress::backends::Backends;
use crate::model::ingress::{HostPattern, IngressRoute, PortRef};
use crate::model::pod::PodRecord;
use crate::model::service::{DEFAULT_AFFINITY_TIMEOUT, Service, SessionAffinity, TrafficPolicy};
use crate::store::records::{ModelChange, RecordSink};

/// What a test endpoint does with a request.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Answers 200 `ok`.
    Answer,
    /// Reads the request head, then closes without answering.
    Drop,
}

/// Requests an endpoint read, by method.
#[derive(Default)]
struct Seen {
    get: AtomicUsize,
    post: AtomicUsize,
}

/// Serves `behaviour` on `ip:port` (port 0: any); returns the port and what it saw.
async fn endpoint(ip: Ipv4Addr, port: u16, behaviour: Behaviour) -> (u16, Arc<Seen>) {
    let l = TcpListener::bind((ip, port))
        .await
        .expect("a loopback port");
    let port = l.local_addr().expect("its address").port();
    let seen = Arc::new(Seen::default());
    let counts = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = counts.clone();
            tokio::spawn(async move {
                let mut have = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => {
                                have.extend_from_slice(&buf[..k]);
                                continue;
                            }
                        }
                    };
                    let head = String::from_utf8_lossy(&have[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while have.len() < end + 4 + len {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => have.extend_from_slice(&buf[..k]),
                        }
                    }
                    have.drain(..end + 4 + len);
                    let counter = if head.starts_with("post") {
                        &seen.post
                    } else {
                        &seen.get
                    };
                    counter.fetch_add(1, Ordering::SeqCst);
                    match behaviour {
                        Behaviour::Drop => return,
                        Behaviour::Answer => {
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(ok).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (port, seen)
}

/// A port on `ip` that refuses connections: bound (so nothing else takes it), never
/// listening.
fn refusing(ip: Ipv4Addr, port: u16) -> socket2::Socket {
    let s =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("a socket");
    s.bind(&SocketAddr::from((ip, port)).into())
        .expect("the port is free on this address");
    s
}

/// A proxy on loopback with route `t.test` → service `web` (port `web`, target `port`),
/// whose pods are `ips`.
fn proxy(ips: &[Ipv4Addr], port: u16) -> (Arc<Proxy>, SocketAddr) {
    let mut b = Backends::new();
    let svc = Service {
        namespace: "default".into(),
        name: "web".into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, 7),
        ports: vec![format!("web=80:{port}/tcp").parse().expect("a port")],
        selector: Some(BTreeMap::from([("app".to_string(), "web".to_string())])),
        session_affinity: SessionAffinity::None,
        session_affinity_timeout: DEFAULT_AFFINITY_TIMEOUT,
        external_traffic_policy: TrafficPolicy::Cluster,
        cluster_ips: Vec::new(),
        ip_families: Vec::new(),
        ip_family_policy: Default::default(),
    };
    b.change(ModelChange::PutService("svc/web".into(), svc));
    for (i, ip) in ips.iter().enumerate() {
        let pod = PodRecord {
            ip6: None,
            container_id: format!("c{i}"),
            ifname: "eth0".into(),
            node: "n1".into(),
            ip: *ip,
            namespace: "default".into(),
            name: format!("web-{i}"),
            labels: BTreeMap::from([("app".to_string(), "web".to_string())]),
        };
        b.change(ModelChange::PutPod(format!("pod/{i}"), pod));
    }
    let p = Arc::new(Proxy::new(
        ProxyConfig::default(),
        b.targets(),
        IngressMetrics::new(),
    ));
    let route = IngressRoute {
        name: "r".into(),
        host: HostPattern::parse("t.test").expect("a host"),
        path: "/".into(),
        namespace: "default".into(),
        service: Some("web".into()),
        port: PortRef::Name("web".into()),
    };
    p.routes
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .upsert(route)
        .expect("a valid route");
    p.set_ready();
    let l = bind(SocketAddr::from(([127, 0, 0, 1], 0)), "test", false).expect("a loopback port");
    let addr = l.local_addr().expect("its address");
    tokio::spawn(p.clone().serve(l, None));
    (p, addr)
}

/// The status of one request (`GET` or `POST` with a small body) through the proxy.
async fn status(proxy: SocketAddr, method: &str) -> u16 {
    let mut s = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("the proxy listens");
    let req = match method {
        "POST" => {
            "POST / HTTP/1.1\r\nHost: t.test\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbody"
        }
        _ => "GET / HTTP/1.1\r\nHost: t.test\r\nConnection: close\r\n\r\n",
    };
    s.write_all(req.as_bytes()).await.expect("sent");
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp).await;
    let text = String::from_utf8_lossy(&resp);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"))
}

#[tokio::test]
async fn a_refusing_endpoint_is_passed_over_and_ejected_and_nothing_is_lost() {
    let live = Ipv4Addr::new(127, 0, 0, 2);
    let dead = Ipv4Addr::new(127, 0, 0, 3);
    let (port, seen) = endpoint(live, 0, Behaviour::Answer).await;
    let _held = refusing(dead, port);
    let (p, addr) = proxy(&[live, dead], port);
    // Requests with a body too: a refused connect sent nothing, so each goes elsewhere.
    for _ in 0..3 {
        assert_eq!(status(addr, "POST").await, 200);
        assert_eq!(status(addr, "GET").await, 200);
    }
    assert_eq!(seen.post.load(Ordering::SeqCst), 3);
    assert_eq!(seen.get.load(Ordering::SeqCst), 3);
    assert!(
        p.metrics.retries.get() >= 1,
        "the refusing endpoint was tried"
    );
    assert!(
        p.balancer
            .is_ejected(SocketAddr::from((dead, port)), Instant::now()),
        "a refusing endpoint is left out for a while"
    );
    assert!(
        !p.balancer
            .is_ejected(SocketAddr::from((live, port)), Instant::now())
    );
}

#[tokio::test]
async fn a_request_an_endpoint_dropped_is_sent_again_only_when_that_is_safe() {
    let live = Ipv4Addr::new(127, 0, 0, 4);
    let flaky = Ipv4Addr::new(127, 0, 0, 5);
    let (port, good) = endpoint(live, 0, Behaviour::Answer).await;
    let (_, bad) = endpoint(flaky, port, Behaviour::Drop).await;
    let (p, addr) = proxy(&[live, flaky], port);
    // A POST that reached the endpoint may have done its work there: 502, never repeated.
    let mut failed = 0;
    for _ in 0..10 {
        match status(addr, "POST").await {
            200 => {}
            502 => failed += 1,
            other => panic!("POST answered {other}"),
        }
    }
    assert_eq!(
        bad.post.load(Ordering::SeqCst),
        failed,
        "each 502 reached it once"
    );
    assert_eq!(
        good.post.load(Ordering::SeqCst),
        10 - failed,
        "none went twice"
    );
    assert!(
        failed >= 1,
        "round robin sent some to the dropping endpoint"
    );
    // A GET is safe to repeat: every one is answered.
    for _ in 0..10 {
        assert_eq!(status(addr, "GET").await, 200);
    }
    assert!(bad.get.load(Ordering::SeqCst) >= 1);
    assert_eq!(good.get.load(Ordering::SeqCst), 10);
    // It answered connects, so it is not ejected.
    assert!(
        !p.balancer
            .is_ejected(SocketAddr::from((flaky, port)), Instant::now())
    );
}
