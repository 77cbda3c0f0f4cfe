//! The gateway's config loader never panics: any text is a config or one clear error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match tollgate_gateway::Config::parse(text) {
        Ok(c) => assert!(!c.upstreams.is_empty(), "a valid config has an upstream"),
        Err(e) => assert!(!e.to_string().is_empty(), "an error says something"),
    }
});
