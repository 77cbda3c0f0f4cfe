//! Prompt-token counting speed: how much an estimate adds in front of a model call, with
//! tiktoken-rs (the Rust port of OpenAI's tokenizer) side by side on the same text.
//!
//! Run: `cargo bench -p tollgate --bench tokens`. Figures go in docs/BENCHMARKS.md.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tollgate::tokens::{Encoding, Message, count_chat};

/// 849 bytes of ordinary English prose, as a typical prompt.
const PROMPT: &str = "You are a careful assistant. Read the following meeting notes and \
summarise them in three bullet points, keeping names and dates exact. The team met on \
Tuesday to review the migration plan for the billing service. Maria presented the load \
test results: the new cluster handled twice the peak traffic of last quarter with p99 \
latency under 120 ms. Kenji raised concerns about the rollback procedure, since the schema \
change is not backwards compatible, and proposed a dual-write period of two weeks. The \
group agreed to schedule the cut-over for the first Monday of next month, pending sign-off \
from the security review. Action items: Maria to publish the test report by Friday; Kenji \
to draft the dual-write design; Priya to book the change window with operations and to \
notify the support team about the expected read-only period during the switch.";

fn tokens(c: &mut Criterion) {
    let mut g = c.benchmark_group("tokens");
    g.throughput(Throughput::Bytes(PROMPT.len() as u64));
    for enc in [Encoding::Cl100kBase, Encoding::O200kBase] {
        enc.warm_up();
        g.bench_function(format!("count_{}", enc.name()), |b| {
            b.iter(|| black_box(enc.count(black_box(PROMPT))))
        });
    }
    let tiktoken = [
        ("cl100k_base", tiktoken_rs::cl100k_base_singleton()),
        ("o200k_base", tiktoken_rs::o200k_base_singleton()),
    ];
    for (name, bpe) in tiktoken {
        g.bench_function(format!("tiktoken_rs_{name}"), |b| {
            b.iter(|| black_box(bpe.encode_ordinary(black_box(PROMPT)).len()))
        });
    }
    let messages = [
        Message::new("system", "You are a careful assistant."),
        Message::new("user", PROMPT),
    ];
    g.bench_function("count_chat_gpt-4o", |b| {
        b.iter(|| black_box(count_chat(black_box("gpt-4o"), black_box(&messages))))
    });
    g.finish();
}

criterion_group!(benches, tokens);
criterion_main!(benches);
