//! What a backend sends back: the response head parsed as `lb::backends::exchange` does (`head_len`, then
//! `parse_response_head`, interim `1xx` heads skipped), then the body decoded by
//! `lb::http::body::Decode` from the framing the head chose. The first input byte picks the request
//! method (GET or HEAD) and how the rest arrives (the size of each read); the rest is the wire.
//! Checks the framing rules of RFC 9112 §6.3 that the head promises, that a counted body never
//! yields more than its length, and that the decoded body, its end and the bytes left after it
//! are the same however the reads fall (all at once, or in reads of the chosen size).

#![no_main]

use bytes::{Bytes, BytesMut};
use hyper::Method;
use hyper::header;
use lb::backends::exchange::{Framing, ResponseHead, head_len, parse_response_head};
use lb::http::body::{Decode, Step};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&control, wire)) = data.split_first() else {
        return;
    };
    let method = if control & 1 == 0 {
        Method::GET
    } else {
        Method::HEAD
    };
    let read_size = usize::from(control >> 1) + 1;
    let mut rest = Bytes::copy_from_slice(wire);
    let head = loop {
        let Ok(Some(len)) = head_len(&rest) else {
            return;
        };
        let raw = rest.split_to(len);
        match parse_response_head(&raw, &method) {
            Ok(Some(head)) => break head,
            Ok(None) => continue,
            Err(_) => return,
        }
    };
    check_head(&head, &method);

    let start = Decode::new(head.framing);
    let whole = decode(start, &rest, rest.len().max(1));
    let pieces = decode(start, &rest, read_size);
    assert_eq!(
        whole, pieces,
        "reads of {read_size} bytes decode differently"
    );
    let (body, end, left) = whole;
    assert!(body.len() + left.len() <= rest.len());
    match head.framing {
        Framing::Empty => assert_eq!((body.len(), end, left.as_slice()), (0, Ok(true), &rest[..])),
        Framing::Length(n) => {
            assert!(body.len() as u64 <= n);
            assert_eq!(end == Ok(true), body.len() as u64 == n);
            assert_eq!(&body[..], &rest[..body.len()]);
        }
        Framing::UntilClose => assert_eq!((&body[..], end), (&rest[..], Ok(false))),
        Framing::Chunked => {}
    }
});

/// The promises of a parsed response head.
fn check_head(head: &ResponseHead, method: &Method) {
    let transfer_coded = head.headers.contains_key(header::TRANSFER_ENCODING);
    if transfer_coded {
        assert!(!head.headers.contains_key(header::CONTENT_LENGTH));
    }
    let bodiless = *method == Method::HEAD
        || head.status.is_informational()
        || head.status.as_u16() == 204
        || head.status.as_u16() == 304;
    assert!(!head.status.is_informational() || head.status.as_u16() == 101);
    match head.framing {
        Framing::Empty => assert!(bodiless),
        Framing::Chunked => assert!(!bodiless && transfer_coded),
        Framing::UntilClose => assert!(!bodiless && !head.keep_alive),
        Framing::Length(_) => {
            assert!(!bodiless && !transfer_coded);
            assert!(head.headers.contains_key(header::CONTENT_LENGTH));
        }
    }
}

/// Decodes `wire` from `state`, delivered in reads of `read_size` bytes, as `UpstreamBody` does:
/// the body, whether it ended (or why it broke), and the bytes left after its end (or unread
/// when the wire ran out).
fn decode(
    mut state: Decode,
    wire: &[u8],
    read_size: usize,
) -> (Vec<u8>, Result<bool, &'static str>, Vec<u8>) {
    let mut buf = BytesMut::new();
    let mut body = Vec::new();
    let mut reads = wire.chunks(read_size);
    loop {
        match state.step(&mut buf) {
            Step::Data(data) => body.extend_from_slice(&data),
            Step::End => {
                for later in reads {
                    buf.extend_from_slice(later);
                }
                return (body, Ok(true), buf.to_vec());
            }
            // What was buffered when the framing broke depends on the reads: not compared.
            Step::Invalid(why) => return (body, Err(why), Vec::new()),
            Step::More => match reads.next() {
                Some(read) => buf.extend_from_slice(read),
                None => return (body, Ok(false), buf.to_vec()),
            },
        }
    }
}
