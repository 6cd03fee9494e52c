//! The wire decoders take untrusted bytes: arbitrary input never panics and
//! never makes the codec reserve more than the frame limit; valid frames and
//! handshakes round-trip.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use raftkv::net::wire::{self, Frame, FrameType, Hello, HelloReply, RefuseReason, Role};
use raftkv::net::{Kind, RemoteFault};
use tokio_util::codec::Decoder;

const FRAME_BYTES_MAX: usize = 4096;

fn frame_type() -> impl Strategy<Value = FrameType> {
    prop_oneof![
        Just(FrameType::Request),
        Just(FrameType::Reply),
        Just(FrameType::OneWay),
        Just(FrameType::Refused(RemoteFault::UnknownKind)),
        any::<u16>()
            .prop_map(|supported| FrameType::Refused(RemoteFault::VersionMismatch { supported })),
        Just(FrameType::Refused(RemoteFault::BadRequest)),
    ]
}

proptest! {
    // Fixed seed: a failure replays with the same inputs (proptest also
    // prints the minimal failing input).
    #![proptest_config(ProptestConfig {
        cases: 2000,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x6e65_7477),
        ..ProptestConfig::default()
    })]

    // Proves decoding arbitrary bytes as a frame or a handshake returns a value or an error, never panics.
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Frame::decode(Bytes::from(bytes.clone()));
        let _ = Hello::decode(&bytes);
        let _ = HelloReply::decode(&bytes);
        let mut magic_first = wire::MAGIC.to_vec();
        magic_first.extend_from_slice(&bytes);
        let _ = Hello::decode(&magic_first);
        let _ = HelloReply::decode(&magic_first);
    }

    // Proves a stream of arbitrary chunks through the length-delimited codec never panics and never buffers beyond the limit.
    #[test]
    fn stream_decoding_is_bounded(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20)) {
        let mut codec = wire::codec(FRAME_BYTES_MAX);
        let mut buffer = BytesMut::new();
        'stream: for chunk in chunks {
            buffer.extend_from_slice(&chunk);
            loop {
                match codec.decode(&mut buffer) {
                    Ok(Some(frame)) => {
                        prop_assert!(frame.len() <= FRAME_BYTES_MAX);
                        let _ = Frame::decode(frame.freeze());
                    }
                    Ok(None) => break,
                    // The transport closes the connection here.
                    Err(_) => break 'stream,
                }
            }
            // The codec reserves at most the frame limit plus what arrived.
            prop_assert!(buffer.capacity() <= FRAME_BYTES_MAX + 4 + 300 * 20, "capacity {}", buffer.capacity());
        }
    }

    // Proves every frame decodes back to itself, sharing the payload.
    #[test]
    fn frames_round_trip(
        id in any::<u16>(), version in any::<u16>(), frame_type in frame_type(), call_id in any::<u64>(),
        payload in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let frame = Frame::new(Kind::new(id, version), frame_type, call_id, Bytes::from(payload));
        prop_assert_eq!(Frame::decode(frame.encode()), Ok(frame));
    }

    // Proves handshakes round-trip.
    #[test]
    fn handshakes_round_trip(cluster_id in any::<u64>(), node_id in any::<u64>(), member in any::<bool>(), refused in any::<Option<u64>>()) {
        let hello = Hello::new(cluster_id, node_id, if member { Role::Member } else { Role::Client });
        prop_assert_eq!(Hello::decode(&hello.encode()), Ok(hello));
        let reply = HelloReply::new(cluster_id, node_id, refused.map(|expected| RefuseReason::WrongCluster { expected }));
        prop_assert_eq!(HelloReply::decode(&reply.encode()), Ok(reply));
    }
}

// Proves a handshake with another magic is recognised as not a raftkv peer.
#[test]
fn wrong_magic_is_reported_as_such() {
    let mut bytes = Hello::new(1, 2, Role::Member).encode().to_vec();
    bytes[0] ^= 0xff;
    assert_eq!(Hello::decode(&bytes), Err(wire::WireError::BadMagic));
}

// A hello, a hello reply or a message followed by stray bytes is refused: a
// message is one value, and bytes after it mean a peer encoding something
// else (before, they were silently ignored).
#[test]
fn trailing_bytes_after_a_hello_or_a_message_are_refused() {
    let hello = Hello::new(7, 2, Role::Client).encode();
    assert_eq!(Hello::decode(&hello).expect("exact").node_id, 2);
    let mut longer = hello.to_vec();
    longer.push(0);
    assert!(Hello::decode(&longer).is_err());
    let reply = HelloReply::new(7, 1, None).encode();
    assert!(HelloReply::decode(&reply).is_ok());
    let mut longer = reply.to_vec();
    longer.extend_from_slice(b"junk");
    assert!(HelloReply::decode(&longer).is_err());
    let value: (u64, String) = (5, "five".into());
    let bytes = postcard::to_allocvec(&value).expect("encode");
    assert_eq!(wire::decode_exact::<(u64, String)>(&bytes), Ok(value));
    let mut longer = bytes.clone();
    longer.push(1);
    assert_eq!(
        wire::decode_exact::<(u64, String)>(&longer),
        Err("1 trailing bytes".to_owned())
    );
    assert!(wire::decode_exact::<(u64, String)>(&bytes[..bytes.len() - 1]).is_err());
}
