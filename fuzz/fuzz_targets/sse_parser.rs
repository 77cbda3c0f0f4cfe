//! The SSE parser never panics, never loses or duplicates a byte, and gives the same
//! events however the stream is cut into chunks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_gateway::sse::Parser;

fuzz_target!(|data: &[u8]| {
    let Some((&seed, input)) = data.split_first() else {
        return;
    };
    let whole = {
        let mut p = Parser::new();
        let mut v = p.push(input).expect("under the event limit");
        v.extend(p.finish());
        v
    };
    let raw: Vec<u8> = whole.iter().flat_map(|e| e.raw.to_vec()).collect();
    assert_eq!(raw, input, "every byte passed on once, in order");
    // The same input in chunks of 1 to 8 bytes (sizes from the seed).
    let mut p = Parser::new();
    let mut got = Vec::new();
    let mut rest = input;
    let mut s = seed as usize;
    while !rest.is_empty() {
        let n = (s % 8 + 1).min(rest.len());
        s = s.wrapping_mul(31).wrapping_add(7);
        got.extend(p.push(&rest[..n]).expect("under the event limit"));
        rest = &rest[n..];
    }
    got.extend(p.finish());
    assert_eq!(got, whole, "chunking changes nothing");
});
