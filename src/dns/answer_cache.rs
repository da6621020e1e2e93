//! The encoded answers a UDP worker gave lately, so the same question is answered again by a
//! copy instead of a decode, a zone lookup and an encode.
//!
//! Exact by construction: [`answer`](crate::dns::answer::answer) is a function of the zone,
//! the fixed [`Authority`](crate::dns::answer::Authority), the transport and the query's
//! bytes, and the response repeats the query's ID (bytes 0–1) and nothing else of it
//! verbatim. So the key is the query without its ID (flags, question as asked, EDNS) and a
//! hit is the stored response with the new ID written in. Every entry carries the zone's
//! generation when its answer was made; any change of the zone makes every older entry a
//! miss (on a cluster that changes all the time the cache just stops helping; it never
//! answers from an older zone).
//!
//! One cache per worker thread (no lock, no shared cache line on the hot path), a fixed
//! number of two-way slots, small responses only: memory is bounded at start.

use ahash::RandomState;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

/// Queries longer than this are not cached (a normal query is 30–80 bytes).
const KEY_MAX: usize = 300;
/// Responses longer than this are not cached (most zone answers are under 200 bytes).
const RESPONSE_MAX: usize = 512;

struct Slot {
    hash: u64,
    generation: u64,
    /// The key (query without ID) followed by the response.
    bytes: Box<[u8]>,
    key_len: u16,
    rcode: ResponseCode,
    qtype: RecordType,
}

/// A hit: the response (with the asker's ID) and what it says, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    /// The response code of the stored answer.
    pub rcode: ResponseCode,
    /// The asked type.
    pub qtype: RecordType,
}

/// A bounded cache of encoded zone answers for one worker thread.
pub struct AnswerCache {
    slots: Vec<Option<Slot>>,
    /// `slots.len() - 2`: masks a hash to the first slot of its pair.
    mask: usize,
    hasher: RandomState,
}

impl AnswerCache {
    /// A cache of about `entries` answers (rounded up to a power of two, at least 2; 0 turns
    /// caching off).
    pub fn new(entries: usize) -> Self {
        let n = if entries == 0 {
            0
        } else {
            entries.next_power_of_two().max(2)
        };
        let mut slots = Vec::with_capacity(n);
        slots.resize_with(n, || None);
        AnswerCache {
            slots,
            mask: n.saturating_sub(2),
            hasher: RandomState::new(),
        }
    }

    /// Writes the stored answer to `query` (made at `generation`) into `out` with the
    /// query's ID, or returns None (and leaves `out` alone).
    pub fn get(&self, query: &[u8], generation: u64, out: &mut Vec<u8>) -> Option<Hit> {
        let key = cache_key(query)?;
        if self.slots.is_empty() {
            return None;
        }
        let hash = self.hasher.hash_one(key);
        let first = (hash as usize) & self.mask;
        for s in self.slots[first..first + 2].iter().flatten() {
            let klen = usize::from(s.key_len);
            if s.hash == hash && s.generation == generation && &s.bytes[..klen] == key {
                out.clear();
                out.extend_from_slice(&s.bytes[klen..]);
                out[0] = query[0];
                out[1] = query[1];
                return Some(Hit {
                    rcode: s.rcode,
                    qtype: s.qtype,
                });
            }
        }
        None
    }

    /// Stores `response` to `query` as made at `generation` (the generation read before the
    /// answer was made: an answer from a newer zone under an older tag is only ever a miss).
    /// Only plain zone answers are kept (NOERROR or NXDOMAIN, not truncated).
    pub fn put(
        &mut self,
        query: &[u8],
        generation: u64,
        response: &[u8],
        rcode: ResponseCode,
        qtype: Option<RecordType>,
        truncated: bool,
    ) {
        let (Some(key), Some(qtype)) = (cache_key(query), qtype) else {
            return;
        };
        if self.slots.is_empty()
            || truncated
            || response.len() < 12
            || response.len() > RESPONSE_MAX
            || !matches!(rcode, ResponseCode::NoError | ResponseCode::NXDomain)
        {
            return;
        }
        let hash = self.hasher.hash_one(key);
        let first = (hash as usize) & self.mask;
        // An empty or outdated slot of the pair first, else the one the hash's top bit names.
        let pick = (0..2)
            .find(|&i| {
                self.slots[first + i]
                    .as_ref()
                    .is_none_or(|s| s.generation != generation)
            })
            .unwrap_or((hash >> 63) as usize);
        let mut bytes = Vec::with_capacity(key.len() + response.len());
        bytes.extend_from_slice(key);
        bytes.extend_from_slice(response);
        self.slots[first + pick] = Some(Slot {
            hash,
            generation,
            bytes: bytes.into_boxed_slice(),
            // cache_key bounds the key to KEY_MAX.
            key_len: u16::try_from(key.len()).unwrap_or(u16::MAX),
            rcode,
            qtype,
        });
    }
}

/// The part of a query its answer depends on: everything but the ID.
fn cache_key(query: &[u8]) -> Option<&[u8]> {
    if query.len() < 12 || query.len() > KEY_MAX {
        return None;
    }
    Some(&query[2..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(id: u16, name: u8) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, name, 0, 0, 1, 0, 1]);
        q
    }

    fn response(id: u16, tag: u8) -> Vec<u8> {
        let mut r = id.to_be_bytes().to_vec();
        r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0, tag]);
        r
    }

    #[test]
    fn a_hit_is_the_stored_answer_with_the_new_id() {
        let mut c = AnswerCache::new(16);
        let mut out = Vec::new();
        assert_eq!(c.get(&query(1, b'a'), 7, &mut out), None);
        c.put(
            &query(1, b'a'),
            7,
            &response(1, 9),
            ResponseCode::NoError,
            Some(RecordType::A),
            false,
        );
        let hit = c.get(&query(0xBEEF, b'a'), 7, &mut out);
        assert_eq!(
            hit,
            Some(Hit {
                rcode: ResponseCode::NoError,
                qtype: RecordType::A
            })
        );
        assert_eq!(out, response(0xBEEF, 9));
        // Another question, or the same after a zone change, is a miss.
        assert_eq!(c.get(&query(1, b'b'), 7, &mut out), None);
        assert_eq!(c.get(&query(1, b'a'), 8, &mut out), None);
    }

    #[test]
    fn only_plain_answers_are_kept() {
        let mut c = AnswerCache::new(16);
        let mut out = Vec::new();
        let q = query(1, b'a');
        for (rcode, truncated) in [
            (ResponseCode::ServFail, false),
            (ResponseCode::FormErr, false),
            (ResponseCode::NoError, true),
        ] {
            c.put(
                &q,
                1,
                &response(1, 1),
                rcode,
                Some(RecordType::A),
                truncated,
            );
            assert_eq!(
                c.get(&q, 1, &mut out),
                None,
                "{rcode:?} truncated={truncated}"
            );
        }
        c.put(
            &q,
            1,
            &vec![0; RESPONSE_MAX + 1],
            ResponseCode::NoError,
            Some(RecordType::A),
            false,
        );
        assert_eq!(c.get(&q, 1, &mut out), None);
        assert_eq!(c.get(&q[..5], 1, &mut out), None);
    }

    #[test]
    fn off_and_tiny_caches_work() {
        let mut out = Vec::new();
        let mut off = AnswerCache::new(0);
        off.put(
            &query(1, b'a'),
            1,
            &response(1, 1),
            ResponseCode::NoError,
            Some(RecordType::A),
            false,
        );
        assert_eq!(off.get(&query(1, b'a'), 1, &mut out), None);
        // Two slots hold two answers; a third replaces one of them, and whatever is found is
        // the right answer for its question.
        let mut tiny = AnswerCache::new(1);
        for n in 0..50u8 {
            tiny.put(
                &query(1, n),
                1,
                &response(1, n),
                ResponseCode::NoError,
                Some(RecordType::A),
                false,
            );
        }
        let mut found = 0;
        for n in 0..50u8 {
            if tiny.get(&query(3, n), 1, &mut out).is_some() {
                assert_eq!(out, response(3, n));
                found += 1;
            }
        }
        assert!((1..=2).contains(&found), "found {found}");
    }
}
