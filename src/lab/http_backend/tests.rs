//! Unit tests of the backend's pure parts: the accept key, base64, the frame codec, the page.

use super::*;

#[test]
fn accept_key_of_the_rfc_6455_example() {
    assert_eq!(
        accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
}

#[test]
fn base64_pads_like_rfc_4648() {
    for (plain, coded) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64(plain.as_bytes()), coded, "{plain:?}");
    }
    assert_eq!(base64(&[0xff, 0xfe, 0xfd]), "//79");
}

fn round_trip(len: usize, mask: Option<[u8; 4]>) {
    let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let bytes = encode_frame(true, Opcode::Binary, &payload, mask);
    let (frame, used) = decode_frame(&bytes, MAX_FRAME_PAYLOAD)
        .expect("a frame we encoded decodes")
        .expect("it is complete");
    assert_eq!(used, bytes.len());
    assert_eq!(frame.payload, payload);
    assert_eq!(frame.masked, mask.is_some());
    assert!(frame.fin);
    assert_eq!(frame.opcode, Opcode::Binary);
    // Every shorter prefix is incomplete, never an error.
    for cut in [0, 1, 2, bytes.len() / 2, bytes.len() - 1] {
        assert_eq!(
            decode_frame(&bytes[..cut], MAX_FRAME_PAYLOAD),
            Ok(None),
            "cut {cut}"
        );
    }
}

#[test]
fn frames_round_trip_with_7_16_and_64_bit_lengths_masked_or_not() {
    for len in [1, 125, 126, 1000, 65535, 65536, 70_000] {
        round_trip(len, None);
        round_trip(len, Some([0x37, 0xfa, 0x21, 0x3d]));
    }
}

#[test]
fn length_fields_use_the_smallest_form() {
    assert_eq!(encode_frame(true, Opcode::Text, &[0; 125], None)[1], 125);
    let f = encode_frame(true, Opcode::Text, &[0; 126], None);
    assert_eq!(&f[1..4], &[126, 0, 126]);
    let f = encode_frame(true, Opcode::Text, &[0; 65536], None);
    assert_eq!(&f[1..10], &[127, 0, 0, 0, 0, 0, 1, 0, 0]);
}

#[test]
fn the_rfc_6455_masked_hello_decodes() {
    // RFC 6455 5.7: a single-frame masked text message "Hello".
    let bytes = [
        0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    let (f, used) = decode_frame(&bytes, 100).expect("valid").expect("complete");
    assert_eq!(
        (f.opcode, f.masked, used),
        (Opcode::Text, true, bytes.len())
    );
    assert_eq!(f.payload, b"Hello");
    assert_eq!(
        encode_frame(true, Opcode::Text, b"Hello", Some([0x37, 0xfa, 0x21, 0x3d])),
        bytes
    );
    assert_eq!(
        encode_frame(true, Opcode::Text, b"Hello", None),
        [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]
    );
}

#[test]
fn two_frames_in_one_buffer_decode_one_after_the_other() {
    let mut bytes = encode_frame(false, Opcode::Text, b"Hel", Some([1, 2, 3, 4]));
    bytes.extend(encode_frame(
        true,
        Opcode::Continuation,
        b"lo",
        Some([5, 6, 7, 8]),
    ));
    let (a, used) = decode_frame(&bytes, 100).expect("valid").expect("complete");
    let (b, rest) = decode_frame(&bytes[used..], 100)
        .expect("valid")
        .expect("complete");
    assert_eq!(
        (a.fin, a.opcode, a.payload.as_slice()),
        (false, Opcode::Text, &b"Hel"[..])
    );
    assert_eq!(
        (b.fin, b.opcode, b.payload.as_slice()),
        (true, Opcode::Continuation, &b"lo"[..])
    );
    assert_eq!(used + rest, bytes.len());
}

#[test]
fn malformed_frames_are_refused_with_the_reason() {
    assert_eq!(
        decode_frame(&[0xc1, 0x00], 100),
        Err(FrameError::ReservedBits(0x40))
    );
    assert_eq!(
        decode_frame(&[0x83, 0x00], 100),
        Err(FrameError::UnknownOpcode(3))
    );
    assert!(matches!(
        decode_frame(&[0x09, 0x00], 100),
        Err(FrameError::BadControl { fin: false, .. })
    ));
    assert!(matches!(
        decode_frame(&[0x89, 126, 0, 126], 1000),
        Err(FrameError::BadControl { len: 126, .. })
    ));
    let huge = [0x82, 127, 0xff, 0, 0, 0, 0, 0, 0, 0];
    assert!(matches!(
        decode_frame(&huge, 100),
        Err(FrameError::TooLarge { .. })
    ));
    assert!(matches!(
        decode_frame(&[0x82, 101], 100),
        Err(FrameError::TooLarge { len: 101, max: 100 })
    ));
}

#[test]
fn the_page_loads_its_script_by_a_relative_url_and_the_script_handles_a_late_run() {
    let html = page_html("b1");
    assert!(html.contains("<script src=\"m.js\"></script>"));
    assert!(html.contains("<p id=\"name\">b1</p>"));
    assert!(html.contains("<title>b1</title>"));
    let js = page_script("b1");
    assert!(js.contains("\"loaded b1\""));
    assert!(js.contains("document.readyState"));
    assert!(js.contains("DOMContentLoaded"));
}

#[test]
fn names_that_would_need_escaping_are_refused() {
    assert!(check_name("pod-1.a_b").is_ok());
    for bad in ["", "a<b", "a\"b", "a b", &"x".repeat(64)] {
        assert!(check_name(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn a_handshake_answer_is_checked_for_status_and_accept_key() {
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let ok = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
    assert!(check_handshake(ok, key).is_ok());
    assert!(check_handshake("HTTP/1.1 200 OK\r\nx: y", key).is_err());
    let wrong = "HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: AAAA";
    assert!(check_handshake(wrong, key).is_err());
}
