//! Feeds arbitrary bytes to every decoder that reads from the network: the
//! handshake decoders, the frame decoder, and the length-delimited stream
//! codec (split into chunks at the positions the input chooses). None may
//! panic, and the stream buffer must stay within the frame limit.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use raftkv::net::wire::{self, Frame, Hello, HelloReply};
use tokio_util::codec::Decoder;

const FRAME_BYTES_MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let _ = Hello::decode(data);
    let _ = HelloReply::decode(data);
    let _ = Frame::decode(Bytes::copy_from_slice(data));

    // First byte picks the chunk size of the stream.
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut codec = wire::codec(FRAME_BYTES_MAX);
    let mut buffer = BytesMut::new();
    for piece in stream.chunks(chunk) {
        buffer.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buffer) {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= FRAME_BYTES_MAX);
                    let _ = Frame::decode(frame.freeze());
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(buffer.capacity() <= FRAME_BYTES_MAX + 4 + stream.len());
    }
});
