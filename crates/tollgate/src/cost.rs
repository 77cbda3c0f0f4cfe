//! What one call takes of each dimension, before it runs ([`Cost`], an estimate) and after
//! ([`Usage`], what the provider reported).
//!
//! Plain numbers, no state: each quota turns a cost into its own units with
//! [`crate::Quota::charge`]. Arithmetic here saturates; it never panics or wraps.

/// What one call costs: requests (1 unless set), input tokens and output tokens.
///
/// Before a call the token counts are estimates: the prompt counted with
/// [`crate::tokens`], and the output as `max_tokens × n` where the provider counts it that
/// way (OpenAI), or an expected output size.
///
/// ```
/// use tollgate::Cost;
/// let cost = Cost::input(3_000).output(2_000);
/// assert_eq!((cost.requests, cost.input, cost.output), (1, 3_000, 2_000));
/// assert_eq!(Cost::request(), Cost::default());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cost {
    /// Requests this call counts as (default 1).
    pub requests: u64,
    /// Input (prompt) tokens.
    pub input: u64,
    /// Output (completion) tokens.
    pub output: u64,
}

impl Default for Cost {
    fn default() -> Self {
        Cost::request()
    }
}

impl Cost {
    /// One request, no tokens.
    ///
    /// ```
    /// assert_eq!(tollgate::Cost::request().requests, 1);
    /// ```
    pub const fn request() -> Cost {
        Cost {
            requests: 1,
            input: 0,
            output: 0,
        }
    }

    /// One request with `tokens` input tokens.
    ///
    /// ```
    /// assert_eq!(tollgate::Cost::input(120).input, 120);
    /// ```
    pub const fn input(tokens: u64) -> Cost {
        Cost {
            requests: 1,
            input: tokens,
            output: 0,
        }
    }

    /// Set the output tokens.
    ///
    /// ```
    /// assert_eq!(tollgate::Cost::input(1).output(7).output, 7);
    /// ```
    pub const fn output(mut self, tokens: u64) -> Cost {
        self.output = tokens;
        self
    }

    /// Set how many requests the call counts as (a batch of prompts in one request is
    /// still one request; an app that fans out may charge several).
    ///
    /// ```
    /// assert_eq!(tollgate::Cost::request().requests(3).requests, 3);
    /// ```
    pub const fn requests(mut self, requests: u64) -> Cost {
        self.requests = requests;
        self
    }
}

/// What a call actually used, as the provider reported it; passed to
/// [`crate::Permit::settle`].
///
/// ```
/// use tollgate::Usage;
/// let usage = Usage::new(3_000, 412);
/// assert_eq!((usage.input, usage.output), (3_000, 412));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Usage {
    /// Input (prompt) tokens used.
    pub input: u64,
    /// Output (completion) tokens used.
    pub output: u64,
}

impl Usage {
    /// Usage of `input` prompt tokens and `output` completion tokens.
    ///
    /// ```
    /// let usage = tollgate::Usage::new(10, 20);
    /// # let _ = usage;
    /// ```
    pub const fn new(input: u64, output: u64) -> Usage {
        Usage { input, output }
    }
}
