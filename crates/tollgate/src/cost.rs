//! What one call takes of each dimension, before it runs ([`Cost`], an estimate) and after
//! ([`Usage`], what the provider reported).
//!
//! Plain numbers, no state: each quota turns a cost into its own units with
//! [`crate::Quota::charge`]. Arithmetic here saturates; it never panics or wraps.

/// What one call costs: requests (1 unless set), input tokens, output tokens, and spend
/// (money, in whatever unit your spend quotas count: micro-dollars, credits).
///
/// Before a call the token counts are estimates: the prompt counted with
/// [`crate::tokens`], and the output as `max_tokens × n` where the provider counts it that
/// way (OpenAI), or an expected output size. The spend is what those tokens would cost
/// at the model's prices.
///
/// ```
/// use tollgate::Cost;
/// let cost = Cost::input(3_000).output(2_000);
/// assert_eq!((cost.requests, cost.input, cost.output, cost.spend), (1, 3_000, 2_000, 0));
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
    /// Spend, in the unit of the limiter's [`crate::Quota::spend`] quotas.
    pub spend: u64,
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
            spend: 0,
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
            spend: 0,
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

    /// Set the spend: what the call would cost, in the unit of the limiter's
    /// [`crate::Quota::spend`] quotas (micro-dollars: `input × price per million input
    /// tokens + output × price per million output tokens`, prices in dollars).
    ///
    /// ```
    /// // gpt-4o at $2.50 / $10.00 per million tokens: 1,000 in, up to 500 out.
    /// let cost = tollgate::Cost::input(1_000).output(500).spend(1_000 * 250 / 100 + 500 * 10);
    /// assert_eq!(cost.spend, 7_500); // $0.0075
    /// ```
    pub const fn spend(mut self, units: u64) -> Cost {
        self.spend = units;
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
/// assert_eq!((usage.input, usage.output, usage.spend), (3_000, 412, 0));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Usage {
    /// Input (prompt) tokens used.
    pub input: u64,
    /// Output (completion) tokens used.
    pub output: u64,
    /// What the call cost, in the unit of the limiter's [`crate::Quota::spend`] quotas.
    pub spend: u64,
}

impl Usage {
    /// Usage of `input` prompt tokens and `output` completion tokens.
    ///
    /// ```
    /// let usage = tollgate::Usage::new(10, 20);
    /// # let _ = usage;
    /// ```
    pub const fn new(input: u64, output: u64) -> Usage {
        Usage {
            input,
            output,
            spend: 0,
        }
    }

    /// Set what the call cost (for [`crate::Quota::spend`] quotas).
    ///
    /// ```
    /// let usage = tollgate::Usage::new(1_000, 120).spend(3_700);
    /// assert_eq!(usage.spend, 3_700);
    /// ```
    pub const fn spend(mut self, units: u64) -> Usage {
        self.spend = units;
        self
    }
}
