//! Prompt-token estimates for OpenAI models, computed offline.
//!
//! The limiter charges a request's input tokens *before* the model call, so it
//! needs a count that is cheap enough to run in front of every request and
//! close to what the provider will bill. This module provides that:
//!
//! * [`Encoding`] names the two byte-pair encodings used by current OpenAI
//!   models, maps a model name to one of them ([`Encoding::for_model`]) and
//!   counts plain text ([`Encoding::count`]).
//! * [`Message`], [`count_chat`] and [`Encoding::count_chat`] count a chat
//!   request's prompt the way OpenAI's cookbook (`num_tokens_from_messages`)
//!   does: [`TOKENS_PER_MESSAGE`] per message, plus the tokens of its role,
//!   content and name, plus [`TOKENS_PER_NAME`] when a name is present, plus
//!   [`REPLY_PRIMING_TOKENS`] once per request.
//! * [`count_text`] counts plain text for a model name.
//!
//! Counts are estimates of what the provider bills: they match tiktoken
//! exactly for text, but tool definitions, images, audio and response-format
//! schemas are not covered here and must be added by the caller.
//!
//! What this module must never do:
//!
//! * **No I/O, no network.** The BPE tables are compiled into the binary by
//!   `bpe-openai`; nothing is read from disk or downloaded. The first count
//!   for an encoding deserialises its table (tens of milliseconds, once per
//!   process); call [`Encoding::warm_up`] at start-up to keep that off the
//!   request path.
//! * **Never panic.** Any `&str` — empty, huge, unknown model names, unusual
//!   Unicode — yields a count. Sums saturate instead of overflowing.

use bpe_openai::Tokenizer;

/// Tokens added for every message of a chat request, whatever its content
/// (`<|start|>`, the role/name separator and `<|end|>` in OpenAI's chat format).
///
/// ```
/// use tollgate::tokens::{Encoding, Message, TOKENS_PER_MESSAGE};
///
/// // An empty message still costs the per-message overhead plus its role.
/// let enc = Encoding::O200kBase;
/// let cost = enc.count_message(&Message::new("user", ""));
/// assert_eq!(cost, TOKENS_PER_MESSAGE + enc.count("user") as u64);
/// ```
pub const TOKENS_PER_MESSAGE: u64 = 3;

/// Extra tokens for a message that carries a `name`, on top of the tokens of
/// the name itself.
///
/// ```
/// use tollgate::tokens::{Encoding, Message, TOKENS_PER_NAME};
///
/// let enc = Encoding::Cl100kBase;
/// let plain = enc.count_message(&Message::new("user", "hi"));
/// let named = enc.count_message(&Message::new("user", "hi").with_name("bob"));
/// assert_eq!(named, plain + TOKENS_PER_NAME + enc.count("bob") as u64);
/// ```
pub const TOKENS_PER_NAME: u64 = 1;

/// Tokens added once per chat request: every reply is primed with
/// `<|start|>assistant<|message|>`.
///
/// ```
/// use tollgate::tokens::{Encoding, REPLY_PRIMING_TOKENS};
///
/// // A request with no messages costs only the reply priming.
/// assert_eq!(Encoding::O200kBase.count_chat(&[]), REPLY_PRIMING_TOKENS);
/// ```
pub const REPLY_PRIMING_TOKENS: u64 = 3;

/// A byte-pair encoding used by OpenAI models.
///
/// ```
/// use tollgate::tokens::Encoding;
///
/// let enc = Encoding::for_model("gpt-4o-mini");
/// assert_eq!(enc, Encoding::O200kBase);
/// assert_eq!(enc.count("hello world"), 2);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// `cl100k_base`: GPT-4 (non-`o`), GPT-3.5 Turbo, `text-embedding-3-*`
    /// and `text-embedding-ada-002`.
    ///
    /// ```
    /// use tollgate::tokens::Encoding;
    ///
    /// assert_eq!(Encoding::for_model("gpt-4-0613"), Encoding::Cl100kBase);
    /// ```
    Cl100kBase,
    /// `o200k_base`: GPT-4o, GPT-4.1, GPT-4.5, GPT-5, the `o1`/`o3`/`o4`
    /// reasoning models and `gpt-oss` — the current default family.
    ///
    /// ```
    /// use tollgate::tokens::Encoding;
    ///
    /// assert_eq!(Encoding::for_model("gpt-5"), Encoding::O200kBase);
    /// ```
    O200kBase,
}

impl Encoding {
    /// Picks the encoding for an OpenAI model name.
    ///
    /// Accepts dated snapshots (`gpt-4o-2024-08-06`), fine-tunes
    /// (`ft:gpt-4o-mini:org::id`), provider prefixes (`openai/gpt-4o`,
    /// `azure/gpt-35-turbo`, `openrouter/openai/gpt-4.1`; everything up to the
    /// last `/` is ignored) and any ASCII letter case.
    ///
    /// * [`Encoding::O200kBase`]: `gpt-4o*`, `chatgpt-4o*`, `gpt-4.1*`,
    ///   `gpt-4.5*`, `gpt-5*`, `o1*`, `o3*`, `o4*`, `gpt-oss*` (which uses
    ///   `o200k_harmony`, identical to `o200k_base` for ordinary text).
    /// * [`Encoding::Cl100kBase`]: `gpt-4` and `gpt-4-*`, `gpt-3.5*`,
    ///   `gpt-35*` (Azure spelling), `text-embedding-3*`,
    ///   `text-embedding-ada-002`, `davinci-002`, `babbage-002`.
    /// * Anything else — including empty strings and Azure deployment names
    ///   that hide the model — maps to [`Encoding::O200kBase`], the encoding
    ///   of every OpenAI model family released since GPT-4o.
    ///
    /// ```
    /// use tollgate::tokens::Encoding;
    ///
    /// assert_eq!(Encoding::for_model("gpt-4o-2024-08-06"), Encoding::O200kBase);
    /// assert_eq!(Encoding::for_model("ft:gpt-4o-mini:org::id"), Encoding::O200kBase);
    /// assert_eq!(Encoding::for_model("azure/gpt-35-turbo"), Encoding::Cl100kBase);
    /// assert_eq!(Encoding::for_model("openai/gpt-4-turbo"), Encoding::Cl100kBase);
    /// assert_eq!(Encoding::for_model("my-deployment"), Encoding::O200kBase);
    /// ```
    #[must_use]
    pub fn for_model(model: &str) -> Self {
        let base = base_model(model);
        // Checked before the `gpt-4` rule: `gpt-4o`, `gpt-4.1`, `gpt-4.5`.
        const O200K: [&str; 9] = [
            "gpt-4o",
            "chatgpt-4o",
            "gpt-4.1",
            "gpt-4.5",
            "gpt-5",
            "gpt-oss",
            "o1",
            "o3",
            "o4",
        ];
        if O200K.iter().any(|family| is_family(base, family)) {
            return Self::O200kBase;
        }
        // `gpt-4` itself or `gpt-4-<suffix>`; a future `gpt-4.x` is not GPT-4.
        let is_gpt4 = strip_prefix_ci(base, "gpt-4")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('-') || rest.starts_with('_'));
        const CL100K: [&str; 6] = [
            "gpt-3.5",
            "gpt-35",
            "text-embedding-3",
            "text-embedding-ada-002",
            "davinci-002",
            "babbage-002",
        ];
        if is_gpt4 || CL100K.iter().any(|family| is_family(base, family)) {
            return Self::Cl100kBase;
        }
        Self::O200kBase
    }

    /// The encoding's name as used by tiktoken.
    ///
    /// ```
    /// use tollgate::tokens::Encoding;
    ///
    /// assert_eq!(Encoding::Cl100kBase.name(), "cl100k_base");
    /// assert_eq!(Encoding::O200kBase.name(), "o200k_base");
    /// ```
    #[must_use]
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Cl100kBase => "cl100k_base",
            Self::O200kBase => "o200k_base",
        }
    }

    /// Loads this encoding's BPE table now instead of on the first count.
    ///
    /// Loading deserialises the compiled-in table (no I/O) and happens once per
    /// process; calling this again is free.
    ///
    /// ```
    /// use tollgate::tokens::Encoding;
    ///
    /// Encoding::O200kBase.warm_up();
    /// Encoding::Cl100kBase.warm_up();
    /// ```
    pub fn warm_up(&self) {
        let _ = self.tokenizer();
    }

    /// Counts the tokens of plain text, exactly as tiktoken's
    /// `len(encoding.encode_ordinary(text))` would: special-token strings such
    /// as `<|endoftext|>` are counted as ordinary text.
    ///
    /// ```
    /// use tollgate::tokens::Encoding;
    ///
    /// assert_eq!(Encoding::Cl100kBase.count("hello world"), 2);
    /// assert_eq!(Encoding::Cl100kBase.count("tiktoken is great!"), 6);
    /// assert_eq!(Encoding::O200kBase.count(""), 0);
    /// ```
    #[must_use]
    pub fn count(&self, text: &str) -> usize {
        if text.is_empty() {
            return 0;
        }
        self.tokenizer().count(text)
    }

    /// Counts one chat message: [`TOKENS_PER_MESSAGE`] plus its role, content
    /// and name, plus [`TOKENS_PER_NAME`] if it has a name. Does not include
    /// [`REPLY_PRIMING_TOKENS`], which is charged once per request.
    ///
    /// ```
    /// use tollgate::tokens::{Encoding, Message};
    ///
    /// let enc = Encoding::Cl100kBase;
    /// // 3 overhead + "user" (1) + "hello world" (2)
    /// assert_eq!(enc.count_message(&Message::new("user", "hello world")), 6);
    /// ```
    #[must_use]
    pub fn count_message(&self, message: &Message<'_>) -> u64 {
        self.count_message_parts(message.role, message.name, [message.content])
    }

    /// Counts one chat message whose content is a list of text parts (the
    /// array form of `content`), without concatenating them.
    ///
    /// Each part is counted on its own and the counts are added; this equals
    /// [`Encoding::count_message`] for a single part. For several parts it can
    /// differ by a token or so per part boundary from counting the joined
    /// text, which is well within estimate accuracy. Non-text parts (images,
    /// audio, files) are not counted: add their cost separately.
    ///
    /// With [`REPLY_PRIMING_TOKENS`] this lets a caller total a request whose
    /// messages mix plain and array content:
    ///
    /// ```
    /// use tollgate::tokens::{Encoding, Message, REPLY_PRIMING_TOKENS};
    ///
    /// let enc = Encoding::for_model("gpt-4o");
    /// let system = Message::new("system", "Be terse.");
    /// let total = REPLY_PRIMING_TOKENS
    ///     + enc.count_message(&system)
    ///     + enc.count_message_parts("user", None, ["Describe", " this image."]);
    ///
    /// // Owned parts work too, e.g. unescaped JSON strings.
    /// let owned: Vec<String> = vec!["Describe".into(), " this image.".into()];
    /// let user = enc.count_message_parts("user", None, &owned);
    /// assert_eq!(total, REPLY_PRIMING_TOKENS + enc.count_message(&system) + user);
    /// ```
    #[must_use]
    pub fn count_message_parts<I>(&self, role: &str, name: Option<&str>, parts: I) -> u64
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let mut total = TOKENS_PER_MESSAGE.saturating_add(self.count_u64(role));
        for part in parts {
            total = total.saturating_add(self.count_u64(part.as_ref()));
        }
        if let Some(name) = name {
            total = total
                .saturating_add(TOKENS_PER_NAME)
                .saturating_add(self.count_u64(name));
        }
        total
    }

    /// Counts a chat request's prompt tokens: every message as in
    /// [`Encoding::count_message`], plus [`REPLY_PRIMING_TOKENS`] once.
    ///
    /// ```
    /// use tollgate::tokens::{Encoding, Message};
    ///
    /// let messages = [
    ///     Message::new("system", "You are terse."),
    ///     Message::new("user", "hello world"),
    /// ];
    /// let n = Encoding::Cl100kBase.count_chat(&messages);
    /// // (3 + "system" 1 + "You are terse." 4) + (3 + 1 + 2) + 3 priming
    /// assert_eq!(n, 17);
    /// ```
    #[must_use]
    pub fn count_chat(&self, messages: &[Message<'_>]) -> u64 {
        messages
            .iter()
            .fold(REPLY_PRIMING_TOKENS, |total, message| {
                total.saturating_add(self.count_message(message))
            })
    }

    fn count_u64(&self, text: &str) -> u64 {
        u64::try_from(self.count(text)).unwrap_or(u64::MAX)
    }

    fn tokenizer(&self) -> &'static Tokenizer {
        match self {
            Self::Cl100kBase => bpe_openai::cl100k_base(),
            Self::O200kBase => bpe_openai::o200k_base(),
        }
    }
}

/// One chat message, borrowed from the request being counted.
///
/// `content` is the message's text; for array content, count the text parts
/// with [`Encoding::count_message_parts`] instead.
///
/// ```
/// use tollgate::tokens::Message;
///
/// let m = Message { role: "user", content: "hi", name: Some("bob") };
/// assert_eq!(m, Message::new("user", "hi").with_name("bob"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Message<'a> {
    /// The role: `system`, `developer`, `user`, `assistant` or `tool`.
    ///
    /// ```
    /// assert_eq!(tollgate::tokens::Message::new("user", "").role, "user");
    /// ```
    pub role: &'a str,
    /// The message text.
    ///
    /// ```
    /// assert_eq!(tollgate::tokens::Message::new("user", "hi").content, "hi");
    /// ```
    pub content: &'a str,
    /// The optional participant name.
    ///
    /// ```
    /// assert_eq!(tollgate::tokens::Message::new("user", "hi").name, None);
    /// ```
    pub name: Option<&'a str>,
}

impl<'a> Message<'a> {
    /// A message without a name.
    ///
    /// ```
    /// use tollgate::tokens::Message;
    ///
    /// const SYSTEM: Message<'static> = Message::new("system", "Be terse.");
    /// assert_eq!(SYSTEM.name, None);
    /// ```
    #[must_use]
    pub const fn new(role: &'a str, content: &'a str) -> Self {
        Self {
            role,
            content,
            name: None,
        }
    }

    /// The same message with `name` set.
    ///
    /// ```
    /// use tollgate::tokens::Message;
    ///
    /// let m = Message::new("system", "Hi").with_name("example_user");
    /// assert_eq!(m.name, Some("example_user"));
    /// ```
    #[must_use]
    pub const fn with_name(self, name: &'a str) -> Self {
        Self {
            name: Some(name),
            ..self
        }
    }
}

/// Counts a chat request's prompt tokens for `model`: shorthand for
/// `Encoding::for_model(model).count_chat(messages)`.
///
/// ```
/// use tollgate::tokens::{count_chat, Message};
///
/// let messages = [
///     Message::new("system", "You are a helpful assistant."),
///     Message::new("user", "hello world"),
/// ];
/// // (3 + "system" 1 + 6) + (3 + "user" 1 + "hello world" 2) + 3 priming
/// assert_eq!(count_chat("gpt-4o-mini", &messages), 19);
/// ```
#[must_use]
pub fn count_chat(model: &str, messages: &[Message<'_>]) -> u64 {
    Encoding::for_model(model).count_chat(messages)
}

/// Counts plain text for `model`, with no chat overhead: shorthand for
/// `Encoding::for_model(model).count(text)`.
///
/// ```
/// use tollgate::tokens::count_text;
///
/// assert_eq!(count_text("gpt-4", "hello world"), 2);
/// assert_eq!(count_text("text-embedding-3-small", ""), 0);
/// ```
#[must_use]
pub fn count_text(model: &str, text: &str) -> u64 {
    u64::try_from(Encoding::for_model(model).count(text)).unwrap_or(u64::MAX)
}

/// Reduces a model string to its base model name: drops surrounding
/// whitespace, provider path prefixes (`openai/`), an `openai.` vendor prefix,
/// the `ft:` fine-tune marker and anything after the next `:`.
fn base_model(model: &str) -> &str {
    let mut base = model.trim();
    if let Some(slash) = base.rfind('/') {
        base = &base[slash + 1..];
    }
    if let Some(rest) = strip_prefix_ci(base, "openai.") {
        base = rest;
    }
    if let Some(rest) = strip_prefix_ci(base, "ft:") {
        base = rest;
    }
    if let Some(colon) = base.find(':') {
        base = &base[..colon];
    }
    base
}

/// `text` without `prefix`, compared ASCII case-insensitively.
fn strip_prefix_ci<'t>(text: &'t str, prefix: &str) -> Option<&'t str> {
    let head = text.as_bytes().get(..prefix.len())?;
    if head.eq_ignore_ascii_case(prefix.as_bytes()) {
        // `prefix` is ASCII and matched, so this is a char boundary.
        text.get(prefix.len()..)
    } else {
        None
    }
}

/// Whether `model` is `family` itself or `family` followed by a non-alphanumeric
/// separator (`gpt-4o-mini`, `gpt-5.1`, `o3-pro`, but not `o3x`).
fn is_family(model: &str, family: &str) -> bool {
    strip_prefix_ci(model, family).is_some_and(|rest| {
        rest.bytes()
            .next()
            .is_none_or(|b| !b.is_ascii_alphanumeric())
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The message list from OpenAI's cookbook "How to count tokens with
    /// tiktoken", section "Counting tokens for chat completions API calls".
    fn cookbook_messages() -> [Message<'static>; 6] {
        [
            Message::new(
                "system",
                "You are a helpful, pattern-following assistant that translates corporate jargon into plain English.",
            ),
            Message::new("system", "New synergies will help drive top-line growth.")
                .with_name("example_user"),
            Message::new("system", "Things working well together will increase revenue.")
                .with_name("example_assistant"),
            Message::new(
                "system",
                "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage.",
            )
            .with_name("example_user"),
            Message::new(
                "system",
                "Let's talk later when we're less busy about how to do better.",
            )
            .with_name("example_assistant"),
            Message::new(
                "user",
                "This late pivot means we don't have time to boil the ocean for the client deliverable.",
            ),
        ]
    }

    #[test]
    fn cookbook_chat_counts() {
        let messages = cookbook_messages();
        // The cookbook reports 129 (counted and billed by the API) for these.
        for model in ["gpt-3.5-turbo-0613", "gpt-3.5-turbo", "gpt-4-0613", "gpt-4"] {
            assert_eq!(count_chat(model, &messages), 129, "{model}");
        }
        // ... and 124 for the gpt-4o family.
        for model in [
            "gpt-4o",
            "gpt-4o-2024-08-06",
            "gpt-4o-mini",
            "gpt-4o-mini-2024-07-18",
        ] {
            assert_eq!(count_chat(model, &messages), 124, "{model}");
        }
    }

    #[test]
    fn known_text_counts() {
        let cl = Encoding::Cl100kBase;
        let o = Encoding::O200kBase;
        assert_eq!(cl.count("hello world"), 2);
        assert_eq!(o.count("hello world"), 2);
        // Cookbook: "tiktoken is great!" -> [83, 1609, 5963, 374, 2294, 0].
        assert_eq!(
            cl.tokenizer().encode("tiktoken is great!"),
            [83, 1609, 5963, 374, 2294, 0]
        );
        assert_eq!(cl.count("tiktoken is great!"), 6);
        assert_eq!(o.count("tiktoken is great!"), 6);
        // Cookbook's encoding comparison.
        assert_eq!(cl.count("antidisestablishmentarianism"), 6);
        assert_eq!(cl.count("2 + 2 = 4"), 7);
        assert_eq!(o.count("2 + 2 = 4"), 7);
        assert_eq!(cl.count("お誕生日おめでとう"), 9);
        assert_eq!(o.count("お誕生日おめでとう"), 8);
        assert_eq!(count_text("gpt-4o", "hello world"), 2);
    }

    #[test]
    fn model_mapping() {
        use Encoding::{Cl100kBase as Cl, O200kBase as O};
        let cases = [
            ("gpt-4o", O),
            ("gpt-4o-2024-08-06", O),
            ("gpt-4o-mini", O),
            ("chatgpt-4o-latest", O),
            ("gpt-4.1", O),
            ("gpt-4.1-nano-2025-04-14", O),
            ("gpt-4.5-preview", O),
            ("gpt-5", O),
            ("gpt-5-mini-2025-08-07", O),
            ("gpt-5.1-codex", O),
            ("o1", O),
            ("o1-preview", O),
            ("o3-mini", O),
            ("o4-mini-2025-04-16", O),
            ("gpt-oss-120b", O),
            ("ft:gpt-4o-mini:org::id", O),
            ("ft:gpt-4o-2024-08-06:my-org:custom:abc123", O),
            ("openai/gpt-4o", O),
            ("openrouter/openai/gpt-5", O),
            ("azure/gpt-4.1", O),
            ("GPT-4O", O),
            ("  gpt-4o  ", O),
            ("openai.gpt-oss-20b-1:0", O),
            ("gpt-4", Cl),
            ("gpt-4-0613", Cl),
            ("gpt-4-turbo-2024-04-09", Cl),
            ("gpt-4-32k", Cl),
            ("gpt-3.5-turbo", Cl),
            ("gpt-3.5-turbo-0125", Cl),
            ("gpt-3.5-turbo-instruct", Cl),
            ("gpt-35-turbo", Cl),
            ("azure/gpt-35-turbo-16k", Cl),
            ("text-embedding-3-small", Cl),
            ("text-embedding-3-large", Cl),
            ("text-embedding-ada-002", Cl),
            ("davinci-002", Cl),
            ("ft:gpt-3.5-turbo-0613:org::id", Cl),
            ("ft:gpt-4-0613:org::id", Cl),
            ("openai/gpt-4", Cl),
            // Unknown names fall back to the current default family.
            ("", O),
            ("/", O),
            ("ft:", O),
            ("claude-sonnet-4", O),
            ("my-azure-deployment", O),
            ("gpt-4.2", O),
            ("o3x", O),
            ("ö1/ü:ß", O),
        ];
        for (model, expected) in cases {
            assert_eq!(Encoding::for_model(model), expected, "{model:?}");
        }
    }

    #[test]
    fn empty_inputs() {
        for enc in [Encoding::Cl100kBase, Encoding::O200kBase] {
            assert_eq!(enc.count(""), 0);
            assert_eq!(enc.count_chat(&[]), REPLY_PRIMING_TOKENS);
            assert_eq!(enc.count_message(&Message::new("", "")), TOKENS_PER_MESSAGE);
            assert_eq!(
                enc.count_message(&Message::new("", "").with_name("")),
                TOKENS_PER_MESSAGE + TOKENS_PER_NAME
            );
            assert_eq!(
                enc.count_message_parts("", None, std::iter::empty::<&str>()),
                TOKENS_PER_MESSAGE
            );
        }
        assert_eq!(count_text("", ""), 0);
        assert_eq!(count_chat("", &[]), REPLY_PRIMING_TOKENS);
    }

    #[test]
    fn parts_add_up() {
        let enc = Encoding::O200kBase;
        let whole = Message::new("user", "hello world").with_name("bob");
        assert_eq!(
            enc.count_message_parts("user", Some("bob"), ["hello world"]),
            enc.count_message(&whole)
        );
        let parts = ["hello", " world", "", "again"];
        let expected =
            TOKENS_PER_MESSAGE + 1 + parts.iter().map(|p| enc.count(p) as u64).sum::<u64>();
        assert_eq!(enc.count_message_parts("user", None, parts), expected);
    }

    #[test]
    fn unusual_unicode_and_large_inputs() {
        let samples = [
            "\0",
            "\u{301}",                      // lone combining mark
            "e\u{301}\u{301}\u{301}",       // stacked marks
            "👩‍👩‍👧‍👦🏳️‍🌈",                         // ZWJ sequences
            "\u{FEFF}\u{200B}\u{2028}\r\n", // BOM, zero width, separators
            "\u{10FFFF}\u{E000}",           // max scalar, private use
            "'s'S'T'RE",
            "   \n\n\t \u{3000}",
        ];
        for enc in [Encoding::Cl100kBase, Encoding::O200kBase] {
            for s in samples {
                let n = enc.count(s);
                assert!(n >= 1 && n <= s.len(), "{s:?}: {n}");
            }
            for unit in ["a", " ", "\n", "é", "1", "!", "🦀", "ab "] {
                let big = unit.repeat((1 << 20) / unit.len());
                let n = enc.count(&big);
                assert!(n >= 1 && n <= big.len(), "{unit:?}: {n}");
            }
        }
    }

    #[test]
    fn warm_up_is_idempotent() {
        Encoding::O200kBase.warm_up();
        Encoding::O200kBase.warm_up();
        assert_eq!(Encoding::O200kBase.count("x"), 1);
    }

    proptest! {
        #[test]
        fn count_never_panics_and_is_bounded(text in any::<String>()) {
            for enc in [Encoding::Cl100kBase, Encoding::O200kBase] {
                let n = enc.count(&text);
                prop_assert!(n <= text.len());
                prop_assert_eq!(n == 0, text.is_empty());
            }
        }

        #[test]
        fn chat_is_sum_of_messages(
            model in any::<String>(),
            msgs in proptest::collection::vec(
                (any::<String>(), any::<String>(), proptest::option::of(any::<String>())),
                0..6,
            ),
        ) {
            let messages: Vec<Message<'_>> = msgs
                .iter()
                .map(|(role, content, name)| Message {
                    role,
                    content,
                    name: name.as_deref(),
                })
                .collect();
            let enc = Encoding::for_model(&model);
            let expected = REPLY_PRIMING_TOKENS
                + messages
                    .iter()
                    .map(|m| {
                        TOKENS_PER_MESSAGE
                            + enc.count(m.role) as u64
                            + enc.count(m.content) as u64
                            + m.name.map_or(0, |n| TOKENS_PER_NAME + enc.count(n) as u64)
                    })
                    .sum::<u64>();
            prop_assert_eq!(count_chat(&model, &messages), expected);
        }

        #[test]
        fn for_model_never_panics(model in ".*") {
            let _ = Encoding::for_model(&model);
            let _ = count_text(&model, &model);
        }
    }
}
