//! Property tests of the WebSocket frame decoder (see `util::proptest_support`): arbitrary
//! bytes never panic it, and every frame the encoder makes decodes back whole.

use proptest::prelude::*;

use super::{MAX_FRAME_PAYLOAD, Opcode, decode_frame, encode_frame};
use crate::util::proptest_support::{arb_bytes, config};

fn arb_opcode() -> impl Strategy<Value = Opcode> {
    prop::sample::select(
        &[
            Opcode::Continuation,
            Opcode::Text,
            Opcode::Binary,
            Opcode::Close,
            Opcode::Ping,
            Opcode::Pong,
        ][..],
    )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in arb_bytes(), max in 0usize..300) {
        if let Ok(Some((frame, used))) = decode_frame(&bytes, max) {
            prop_assert!(used <= bytes.len());
            prop_assert!(frame.payload.len() <= max);
        }
    }

    #[test]
    fn a_header_then_arbitrary_bytes_never_panics_the_decoder(
        b0 in any::<u8>(),
        len in prop::sample::select(&[0u8, 1, 125, 126, 127, 0x80 | 126, 0x80 | 127][..]),
        rest in arb_bytes(),
    ) {
        let mut bytes = vec![b0, len];
        bytes.extend(rest);
        let _ = decode_frame(&bytes, MAX_FRAME_PAYLOAD);
    }

    #[test]
    fn encoded_frames_decode_back(
        opcode in arb_opcode(),
        fin in any::<bool>(),
        head in arb_bytes(),
        pad in prop::sample::select(&[0usize, 126, 65_536][..]),
        mask in proptest::option::of(any::<[u8; 4]>()),
    ) {
        // Arbitrary bytes, lengthened past the 7- and 16-bit length forms in some cases.
        let mut payload = head;
        payload.extend((0..pad).map(|i| i as u8));
        let control = opcode.is_control();
        let payload = if control { &payload[..payload.len().min(125)] } else { &payload[..] };
        let fin = fin || control;
        let bytes = encode_frame(fin, opcode, payload, mask);
        let (frame, used) = decode_frame(&bytes, MAX_FRAME_PAYLOAD)
            .map_err(|e| TestCaseError::fail(e.to_string()))?
            .ok_or_else(|| TestCaseError::fail("incomplete"))?;
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!((frame.fin, frame.opcode, frame.masked), (fin, opcode, mask.is_some()));
        prop_assert_eq!(frame.payload.as_slice(), payload);
    }
}
