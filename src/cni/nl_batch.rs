//! A small synchronous rtnetlink client for tartand's ADD fast path: several requests go to
//! the kernel in **one** `sendto` (the kernel handles every message of the buffer in order,
//! inside that call), then their answers are read. rtnetlink's async connection sends one
//! request per wake-up and waits for its answer before the next (a round trip through the
//! runtime each), which cost more than the kernel work of the small requests of an ADD.
//!
//! Messages are built with rtnetlink's builders and netlink-packet-route's types, as
//! everywhere else; only the transport differs.

use std::io;
use std::time::Duration;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{LinkAttribute, LinkExtentMask, LinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// What a request expects back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// An acknowledgement (the request carries `NLM_F_ACK`).
    Ack,
    /// One message (a `GET` of a single object, no `NLM_F_ACK`).
    Message,
}

/// One request of a batch.
#[derive(Debug, Clone)]
pub struct Request {
    /// The message.
    pub message: RouteNetlinkMessage,
    /// Netlink flags (`NLM_F_*`).
    pub flags: u16,
    /// What answers it.
    pub expect: Expect,
}

impl Request {
    /// A change of an existing object (`NLM_F_REQUEST | NLM_F_ACK`), e.g. a link set up.
    pub fn change(message: RouteNetlinkMessage) -> Request {
        Request {
            message,
            flags: NLM_F_REQUEST | NLM_F_ACK,
            expect: Expect::Ack,
        }
    }

    /// A creation that fails with EEXIST when the object exists.
    pub fn create(message: RouteNetlinkMessage) -> Request {
        Request {
            message,
            flags: NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            expect: Expect::Ack,
        }
    }

    /// A creation that replaces an existing object.
    pub fn replace(message: RouteNetlinkMessage) -> Request {
        Request {
            message,
            flags: NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            expect: Expect::Ack,
        }
    }

    /// A `GET` of one object.
    pub fn get(message: RouteNetlinkMessage) -> Request {
        Request {
            message,
            flags: NLM_F_REQUEST,
            expect: Expect::Message,
        }
    }

    /// `GETLINK` of the interface `index` (without statistics: cheaper to fill).
    pub fn get_link_by_index(index: u32) -> Request {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes
            .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
        Request::get(RouteNetlinkMessage::GetLink(m))
    }

    /// `GETLINK` of the interface `name` (without statistics).
    pub fn get_link_by_name(name: &str) -> Request {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        m.attributes
            .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
        Request::get(RouteNetlinkMessage::GetLink(m))
    }
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Acknowledged.
    Ack,
    /// The object asked for.
    Message(Box<RouteNetlinkMessage>),
    /// The kernel's error (a positive errno).
    Error(i32),
}

impl Answer {
    /// The errno, if it failed.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Answer::Error(e) => Some(*e),
            _ => None,
        }
    }
    /// Succeeded, or failed with `ok_errno` (e.g. EEXIST for an idempotent creation).
    pub fn ok_or(&self, ok_errno: i32) -> bool {
        match self {
            Answer::Error(e) => *e == ok_errno,
            _ => true,
        }
    }
    /// The link of a `GETLINK` answer.
    pub fn link(&self) -> Option<&LinkMessage> {
        match self {
            Answer::Message(m) => match m.as_ref() {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            },
            _ => None,
        }
    }
}

/// A blocking rtnetlink socket of the namespace it was opened in.
pub struct SyncNetlink {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl SyncNetlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> io::Result<SyncNetlink> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // Acknowledgements without a copy of the request.
        sock.set_cap_ack(true)?;
        // The kernel answers every request; a bug here must not hang a worker forever.
        nix::sys::socket::setsockopt(
            &sock,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &timeval(Duration::from_secs(5)),
        )
        .map_err(io::Error::from)?;
        Ok(SyncNetlink {
            sock,
            seq: 1,
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    /// Sends `reqs` in one `sendto` and returns their answers, in order.
    pub fn batch(&mut self, reqs: &[Request]) -> io::Result<Vec<Answer>> {
        let first = self.seq;
        let mut out = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            let mut header = NetlinkHeader::default();
            header.flags = r.flags;
            header.sequence_number = first.wrapping_add(i as u32);
            let mut msg =
                NetlinkMessage::new(header, NetlinkPayload::InnerMessage(r.message.clone()));
            msg.finalize();
            let start = out.len();
            out.resize(start + msg.buffer_len(), 0);
            msg.serialize(&mut out[start..]);
        }
        self.seq = first.wrapping_add(reqs.len() as u32);
        self.sock.send(&out, 0)?;
        let mut answers: Vec<Option<Answer>> = vec![None; reqs.len()];
        let mut left = reqs.len();
        while left > 0 {
            self.buf.clear();
            let n = self.sock.recv(&mut self.buf, 0)?;
            if n > self.buf.len() {
                return Err(io::Error::other("netlink answer truncated"));
            }
            let mut off = 0;
            while off < self.buf.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[off..])
                    .map_err(|e| io::Error::other(format!("netlink answer: {e}")))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
                let seq = msg.header.sequence_number.wrapping_sub(first) as usize;
                let Some(slot) = answers.get_mut(seq) else {
                    continue; // a late answer of an earlier batch
                };
                let expect = reqs[seq].expect;
                let answer = match msg.payload {
                    NetlinkPayload::Error(e) => match e.code {
                        None => Answer::Ack,
                        Some(c) => Answer::Error(-c.get()),
                    },
                    NetlinkPayload::InnerMessage(m) if expect == Expect::Message => {
                        Answer::Message(Box::new(m))
                    }
                    _ => continue,
                };
                if slot.is_none() {
                    *slot = Some(answer);
                    left -= 1;
                }
            }
        }
        Ok(answers
            .into_iter()
            .map(|a| a.unwrap_or(Answer::Ack))
            .collect())
    }
}

fn timeval(d: Duration) -> nix::sys::time::TimeVal {
    nix::sys::time::TimeVal::new(d.as_secs() as _, d.subsec_micros() as _)
}
