//! Socket-level probes run inside network namespaces: echo servers and request/response
//! round trips over a kept connection.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use crate::lab::in_netns;

/// How long a reader busy-waits for data before it blocks. Busy-waiting keeps thread wake-up
/// latency out of the per-hop figures: on this kind of VM a blocked thread takes from tens to
/// ~450 µs to wake, which would swamp hops of 1-5 µs. Tried and rejected: 200 µs (servers then
/// often sleep between a path's exchanges and pay the wake-up), yielding instead of spinning (a
/// steady ~100 µs per round trip). The price is a few multi-millisecond tails when spinners
/// outnumber the 2 cores; p99.9 shows them, medians do not move.
const SPIN: Duration = Duration::from_millis(5);

/// One turn of a busy wait.
fn wait_turn(_start: Instant) {
    std::hint::spin_loop();
}

/// Runs a non-blocking `op` until it stops saying `WouldBlock`, busy-waiting up to [`SPIN`];
/// after that calls `op(true)`, which must do one blocking attempt.
fn spin_then_block<T>(mut op: impl FnMut(bool) -> std::io::Result<T>) -> std::io::Result<T> {
    let start = Instant::now();
    let mut i = 0u32;
    loop {
        match op(false) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                i = i.wrapping_add(1);
                if i.is_multiple_of(256) && start.elapsed() > SPIN {
                    return op(true);
                }
                wait_turn(start);
            }
            r => return r,
        }
    }
}

/// Reads from a non-blocking stream, busy-waiting up to [`SPIN`], then blocking (with the
/// stream's read timeout).
fn tcp_read_spin(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    spin_then_block(|block| {
        if !block {
            return s.read(buf);
        }
        s.set_nonblocking(false)?;
        let r = s.read(buf);
        s.set_nonblocking(true)?;
        r
    })
}

/// Receives from a non-blocking UDP socket the same way.
fn udp_recv_spin(s: &std::net::UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    spin_then_block(|block| {
        if !block {
            return s.recv_from(buf);
        }
        s.set_nonblocking(false)?;
        let r = s.recv_from(buf);
        s.set_nonblocking(true)?;
        r
    })
}

/// Starts a TCP server in `ns` listening on `port` and returns once it listens. Each accepted
/// connection is passed to `handle` on the accept thread (spawn there for long conversations).
/// The server lives until the namespace goes away.
pub fn tcp_server<F>(ns: &str, port: u16, what: &'static str, handle: F) -> Result<()>
where
    F: FnMut(TcpStream) + Send + 'static,
{
    tcp_server_on(ns, SocketAddr::from(([0, 0, 0, 0], port)), what, handle)
}

/// [`tcp_server`] on `addr`; an IPv6 address listens for IPv6 only.
pub fn tcp_server_on<F>(ns: &str, addr: SocketAddr, what: &'static str, mut handle: F) -> Result<()>
where
    F: FnMut(TcpStream) + Send + 'static,
{
    spawn_listener(ns, what, move |tx| {
        let bound = bound_socket(addr, socket2::Type::STREAM)
            .and_then(|s| s.listen(1024).map(|()| TcpListener::from(s)));
        let l = match bound {
            Ok(l) => l,
            Err(e) => {
                let _ = tx.send(Err(format!("{addr}: {e}")));
                return;
            }
        };
        let _ = tx.send(Ok(()));
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            handle(s);
        }
    })
}

/// Starts a TCP echo server in `ns` on `port`, serving until the namespace goes away.
pub fn tcp_echo_server(ns: &str, port: u16) -> Result<()> {
    tcp_server(ns, port, "echo", echo_conn)
}

/// Echoes one accepted connection on a thread of its own, busy-waiting for data.
fn echo_conn(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    if s.set_nonblocking(true).is_err() {
        return;
    }
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        loop {
            match tcp_read_spin(&mut s, &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if write_all_nb(&mut s, &buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
}

/// `write_all` on a non-blocking stream (spins while the send buffer is full).
fn write_all_nb(s: &mut TcpStream, mut b: &[u8]) -> std::io::Result<()> {
    while !b.is_empty() {
        match s.write(b) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => b = &b[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Round trips of a 1-byte request/response over one kept TCP connection from `ns`
/// (both ends busy-wait for data, so the figure is the path, not thread wake-ups).
pub fn tcp_rr(ns: &str, dst: impl Into<IpAddr>, port: u16, count: usize) -> Result<Vec<Duration>> {
    let dst: IpAddr = dst.into();
    in_netns(ns, move || -> Result<Vec<Duration>> {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((dst, port)), Duration::from_secs(3))
                .with_context(|| format!("connecting to {dst}:{port}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.set_nonblocking(true)?;
        let mut out = Vec::with_capacity(count);
        let mut b = [0u8; 1];
        for i in 0..count {
            let t = Instant::now();
            write_all_nb(&mut s, &[i as u8])?;
            if tcp_read_spin(&mut s, &mut b)? == 0 {
                return Err(anyhow!("{dst}:{port} closed the connection"));
            }
            out.push(t.elapsed());
        }
        Ok(out)
    })?
}

/// Starts a TCP "who am I" server in `ns`: every connection gets one line
/// `<name> <client address as seen>` and is closed.
pub fn tcp_whoami_server(ns: &str, port: u16, name: &str) -> Result<()> {
    tcp_whoami_server_on(ns, SocketAddr::from(([0, 0, 0, 0], port)), name)
}

/// [`tcp_whoami_server`] on `addr` (`[::]:PORT` for IPv6 clients; IPv6 only, so it binds
/// beside an IPv4 one on the same port).
pub fn tcp_whoami_server_on(ns: &str, addr: SocketAddr, name: &str) -> Result<()> {
    let name = name.to_string();
    tcp_server_on(ns, addr, "whoami", move |mut s| {
        let peer = s
            .peer_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let _ = s.write_all(format!("{name} {peer}\n").as_bytes());
    })
}

/// Starts a UDP "who am I" server in `ns`: every datagram is answered with
/// `<name> <client address as seen>`.
pub fn udp_whoami_server(ns: &str, port: u16, name: &str) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let ns = ns.to_string();
    let name = name.to_string();
    std::thread::spawn(move || {
        let _ = in_netns(&ns, move || {
            let s = match std::net::UdpSocket::bind(("0.0.0.0", port)) {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = tx.send(Ok(()));
            let mut buf = [0u8; 2048];
            loop {
                let Ok((_, from)) = s.recv_from(&mut buf) else {
                    return;
                };
                let _ = s.send_to(format!("{name} {}", from.ip()).as_bytes(), from);
            }
        });
    });
    rx.recv_timeout(Duration::from_secs(10))
        .context("UDP whoami server did not start")?
        .map_err(|e| anyhow!("UDP whoami server on port {port}: {e}"))
}

/// What a who-am-I server said: its name and the client address it saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Whoami {
    /// The server's name.
    pub name: String,
    /// The client address as the server saw it.
    pub peer: String,
}

/// Connects from `ns` to a TCP who-am-I server (a fresh connection each call).
pub fn tcp_whoami(
    ns: &str,
    dst: impl Into<std::net::IpAddr>,
    port: u16,
    timeout: Duration,
) -> Result<Whoami> {
    let dst = dst.into();
    in_netns(ns, move || -> Result<Whoami> {
        whoami_here(dst, port, timeout)
    })?
}

/// [`tcp_whoami`] from the calling thread's namespace.
pub fn whoami_here(
    dst: impl Into<std::net::IpAddr>,
    port: u16,
    timeout: Duration,
) -> Result<Whoami> {
    let dst: std::net::IpAddr = dst.into();
    let mut s = TcpStream::connect_timeout(&SocketAddr::from((dst, port)), timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    s.read_to_string(&mut line)?;
    let mut it = line.split_whitespace();
    Ok(Whoami {
        name: it.next().unwrap_or_default().to_string(),
        peer: it.next().unwrap_or_default().to_string(),
    })
}

/// `count` fresh TCP connections from `ns`, one thread, returning each answer (or error text).
pub fn tcp_whoami_many(
    ns: &str,
    dst: Ipv4Addr,
    port: u16,
    count: usize,
) -> Result<Vec<Result<Whoami, String>>> {
    in_netns(ns, move || {
        (0..count)
            .map(|_| whoami_here(dst, port, Duration::from_secs(3)).map_err(|e| e.to_string()))
            .collect()
    })
}

/// Ports the bench servers listen on in every destination namespace.
pub mod ports {
    /// TCP echo (request/response on a kept connection).
    pub const TCP_RR: u16 = 7001;
    /// UDP echo.
    pub const UDP_RR: u16 = 7002;
    /// Writes one byte on accept (new-connection latency).
    pub const FIRST_BYTE: u16 = 7003;
    /// Reads and discards (throughput).
    pub const SINK: u16 = 7004;
}

fn spawn_listener<F>(ns: &str, what: &'static str, f: F) -> Result<()>
where
    F: FnOnce(std::sync::mpsc::Sender<Result<(), String>>) + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let ns = ns.to_string();
    std::thread::spawn(move || {
        let _ = in_netns(&ns, move || f(tx));
    });
    rx.recv_timeout(Duration::from_secs(10))
        .with_context(|| format!("{what} server did not start"))?
        .map_err(|e| anyhow!("{what} server: {e}"))
}

/// Starts the four bench servers (TCP echo, UDP echo, first byte, sink) in `ns`, on IPv4.
pub fn bench_servers(ns: &str) -> Result<()> {
    bench_servers_on(ns, IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// The unspecified address of `ip`'s family.
fn unspecified(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// A socket of `ty` bound to `addr` (IPv6 sockets IPv6-only, so an IPv4 set of servers can
/// listen on the same ports beside them).
fn bound_socket(addr: SocketAddr, ty: socket2::Type) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), ty, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

/// Starts the four bench servers in `ns` on `any` (`0.0.0.0` or `::`, the family's every
/// address); an IPv6 set is IPv6-only and sits beside the IPv4 one on the same ports.
pub fn bench_servers_on(ns: &str, any: IpAddr) -> Result<()> {
    tcp_server_on(ns, SocketAddr::new(any, ports::TCP_RR), "echo", echo_conn)?;
    spawn_listener(ns, "UDP echo", move |tx| {
        let s = match bound_socket(SocketAddr::new(any, ports::UDP_RR), socket2::Type::DGRAM)
            .map(std::net::UdpSocket::from)
        {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
                return;
            }
        };
        if s.set_nonblocking(true).is_err() {
            let _ = tx.send(Err("cannot make the UDP socket non-blocking".into()));
            return;
        }
        let _ = tx.send(Ok(()));
        let mut buf = [0u8; 2048];
        loop {
            let Ok((n, from)) = udp_recv_spin(&s, &mut buf) else {
                return;
            };
            let _ = s.send_to(&buf[..n], from);
        }
    })?;
    spawn_listener(ns, "first-byte", move |tx| {
        let bound = bound_socket(
            SocketAddr::new(any, ports::FIRST_BYTE),
            socket2::Type::STREAM,
        )
        .and_then(|s| s.listen(1024).map(|()| TcpListener::from(s)));
        let l = match bound {
            Ok(l) => l,
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
                return;
            }
        };
        if l.set_nonblocking(true).is_err() {
            let _ = tx.send(Err("cannot make the listener non-blocking".into()));
            return;
        }
        let _ = tx.send(Ok(()));
        let mut idle = Instant::now();
        loop {
            match l.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.write_all(b"x");
                    idle = Instant::now();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if idle.elapsed() > SPIN {
                        // Nothing for a while: block until the next connection.
                        let _ = l.set_nonblocking(false);
                        if let Ok((mut s, _)) = l.accept() {
                            let _ = s.write_all(b"x");
                        }
                        let _ = l.set_nonblocking(true);
                        idle = Instant::now();
                    }
                    std::hint::spin_loop();
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    })?;
    tcp_server_on(ns, SocketAddr::new(any, ports::SINK), "sink", |mut s| {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        });
    })
}

/// One UDP round trip's timing: the whole round trip as the application sees it, and the
/// part between the reply reaching the kernel (SO_TIMESTAMPNS) and the application reading it.
#[derive(Debug, Clone, Copy)]
pub struct UdpSample {
    /// send() to recv() returning.
    pub total: Duration,
    /// Kernel receive timestamp to recv() returning (socket delivery and wake-up).
    pub delivery: Option<Duration>,
}

/// `count` UDP round trips of 1 byte from `ns` to `dst`, with kernel receive timestamps.
pub fn udp_rr(ns: &str, dst: impl Into<IpAddr>, port: u16, count: usize) -> Result<Vec<UdpSample>> {
    let dst: IpAddr = dst.into();
    in_netns(ns, move || -> Result<Vec<UdpSample>> {
        use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt};
        use std::io::IoSliceMut;
        use std::os::fd::AsRawFd;
        let s = std::net::UdpSocket::bind(SocketAddr::new(unspecified(dst), 0))?;
        s.connect((dst, port))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        setsockopt(&s, sockopt::ReceiveTimestampns, &true).context("SO_TIMESTAMPNS")?;
        let mut out = Vec::with_capacity(count);
        let mut buf = [0u8; 64];
        let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
        for i in 0..count {
            let t0 = Instant::now();
            s.send(&[i as u8])?;
            let mut iov = [IoSliceMut::new(&mut buf)];
            // Busy-wait (MSG_DONTWAIT) up to SPIN, then block with the socket's timeout.
            let msg = loop {
                let flags = if t0.elapsed() < SPIN {
                    MsgFlags::MSG_DONTWAIT
                } else {
                    MsgFlags::empty()
                };
                match recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut cmsg), flags) {
                    Ok(m) => break m,
                    Err(nix::errno::Errno::EAGAIN) if flags == MsgFlags::MSG_DONTWAIT => {
                        wait_turn(t0);
                    }
                    Err(e) => {
                        return Err(anyhow!(e).context(format!("UDP reply from {dst}:{port}")));
                    }
                }
            };
            let total = t0.elapsed();
            let now_real = std::time::SystemTime::now();
            let mut delivery = None;
            for c in msg.cmsgs().into_iter().flatten() {
                if let ControlMessageOwned::ScmTimestampns(ts) = c {
                    let k = std::time::UNIX_EPOCH
                        + Duration::new(ts.tv_sec() as u64, ts.tv_nsec() as u32);
                    delivery = now_real.duration_since(k).ok();
                }
            }
            out.push(UdpSample { total, delivery });
        }
        Ok(out)
    })?
}

/// `count` new TCP connections from `ns`: connect until the server's first byte arrives.
pub fn new_conns(
    ns: &str,
    dst: impl Into<IpAddr>,
    port: u16,
    count: usize,
) -> Result<Vec<Duration>> {
    let dst: IpAddr = dst.into();
    in_netns(ns, move || -> Result<Vec<Duration>> {
        let mut out = Vec::with_capacity(count);
        let mut b = [0u8; 1];
        for _ in 0..count {
            let t0 = Instant::now();
            let mut s =
                TcpStream::connect_timeout(&SocketAddr::from((dst, port)), Duration::from_secs(3))
                    .with_context(|| format!("connecting to {dst}:{port}"))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.set_nonblocking(true)?;
            if tcp_read_spin(&mut s, &mut b)? == 0 {
                return Err(anyhow!("{dst}:{port} closed before the first byte"));
            }
            out.push(t0.elapsed());
            // Reset rather than TIME_WAIT: thousands of connections must not exhaust ports.
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        }
        Ok(out)
    })?
}

/// One TCP flow from `ns` to a sink at `dst:port` for `secs` seconds; returns Gbit/s.
pub fn throughput(ns: &str, dst: impl Into<IpAddr>, port: u16, secs: f64) -> Result<f64> {
    let dst: IpAddr = dst.into();
    in_netns(ns, move || -> Result<f64> {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((dst, port)), Duration::from_secs(3))
                .with_context(|| format!("connecting to {dst}:{port}"))?;
        let buf = vec![0x5au8; 1 << 16];
        let t0 = Instant::now();
        let mut bytes = 0u64;
        while t0.elapsed().as_secs_f64() < secs {
            s.write_all(&buf)?;
            bytes += buf.len() as u64;
        }
        let el = t0.elapsed().as_secs_f64();
        Ok(bytes as f64 * 8.0 / el / 1e9)
    })?
}

/// What one DNS query over UDP got: the response code and the A records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsAnswer {
    /// Response code (`NOERROR`, `NXDOMAIN`, ...).
    pub rcode: String,
    /// Addresses in the answer section.
    pub addrs: Vec<Ipv4Addr>,
}

/// Asks `server` (from the calling thread's namespace) for the A records of `name`; None
/// when no answer came within `timeout`.
pub fn dns_a_here(server: SocketAddr, name: &str, timeout: Duration) -> Result<Option<DnsAnswer>> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    let mut m = Message::query();
    let id: u16 = rand::random();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(
        Name::from_ascii(name).context("query name")?,
        RecordType::A,
    ));
    let wire = m.to_vec().context("encoding a query")?;
    let sock = std::net::UdpSocket::bind(("0.0.0.0", 0)).context("binding a UDP socket")?;
    sock.set_read_timeout(Some(timeout))?;
    sock.send_to(&wire, server).context("sending a query")?;
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let Ok(n) = sock.recv(&mut buf) else {
            return Ok(None);
        };
        let Ok(r) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        if r.metadata.id != id {
            continue;
        }
        let addrs = r
            .answers
            .iter()
            .filter_map(|rec| match &rec.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        return Ok(Some(DnsAnswer {
            rcode: crate::dns::answer::rcode_name(r.metadata.response_code),
            addrs,
        }));
    }
    Ok(None)
}
