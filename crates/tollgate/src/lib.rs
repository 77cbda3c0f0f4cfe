//! tollgate (work in progress)
#![allow(missing_docs)]
mod algo;
pub mod cost;
pub mod quota;
pub use cost::{Cost, Usage};
pub use quota::{Accounting, Algorithm, ConfigError, Dimension, Quota, Scope};
pub struct Limiter;
pub struct LimiterBuilder;
pub struct Permit;
pub mod tokens {}
