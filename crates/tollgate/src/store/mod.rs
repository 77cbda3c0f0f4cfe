//! Where limiter state lives. Stores hold numbers and apply [`crate::algo`]'s decisions
//! atomically; they know nothing of HTTP and never sleep.

pub(crate) mod memory;
pub(crate) mod redis;
