//! Model names as limits see them: one canonical name per model, whatever spelling a
//! caller sends.
//!
//! A caller could otherwise walk past a `gpt-4o` limit by asking for `GPT-4o`,
//! `openai/gpt-4o` or the snapshot `gpt-4o-2024-08-06`. Every lookup by model (the
//! upstream, its account, a tier's model limits, prices, the worst-case output) goes
//! through [`Models::resolve`] first. This module only names models; it never decides a
//! limit or touches a request.

use std::collections::{HashMap, HashSet};

use crate::config::{Config, DEFAULT_IMAGE_INPUT_TOKENS, DEFAULT_MAX_OUTPUT_TOKENS};

/// What the gateway knows of model names.
pub(crate) struct Models {
    /// Every model the configuration names (lowercase).
    known: HashSet<String>,
    /// Models some upstream lists: with `strict`, the only ones served.
    listed: HashSet<String>,
    strict: bool,
    /// Alias (lowercase) → the model it stands for, as written.
    aliases: HashMap<String, String>,
    /// `[max_output_tokens]`, lowercase, without `"*"`.
    max_output: HashMap<String, u64>,
    default_max_output: u64,
    /// `[image_input_tokens]`, lowercase, without `"*"`.
    image: HashMap<String, u64>,
    default_image: u64,
}

/// A request's model, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resolved {
    /// The name limits, prices and routing use.
    pub(crate) canonical: String,
    /// The name to send upstream when it differs from what the caller wrote (an alias's
    /// model, a known model without its provider prefix or in lowercase).
    pub(crate) forward: Option<String>,
}

/// A dated snapshot's model: `gpt-4o-2024-08-06` and `claude-3-5-sonnet-20241022` without
/// their dates, `gpt-4-0613` and `gpt-4-1106-preview` without theirs (OpenAI's older
/// `MMDD` form), `gpt-4o-latest` without `-latest`.
fn without_snapshot(name: &str) -> Option<&str> {
    let name = name.strip_suffix("-preview").unwrap_or(name);
    let b = name.as_bytes();
    let digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    let n = b.len();
    if n > 11 && b[n - 11] == b'-' && b[n - 6] == b'-' && b[n - 3] == b'-' {
        let (y, m, d) = (&b[n - 10..n - 6], &b[n - 5..n - 3], &b[n - 2..]);
        if digits(y) && digits(m) && digits(d) {
            return Some(&name[..n - 11]);
        }
    }
    if n > 9 && b[n - 9] == b'-' && digits(&b[n - 8..]) {
        return Some(&name[..n - 9]);
    }
    if n > 5 && b[n - 5] == b'-' && digits(&b[n - 4..]) {
        return Some(&name[..n - 5]);
    }
    name.strip_suffix("-latest").filter(|s| !s.is_empty())
}

impl Models {
    pub(crate) fn new(config: &Config) -> Models {
        let lower = |s: &str| s.trim().to_ascii_lowercase();
        let mut listed = HashSet::new();
        for u in config.upstreams.values() {
            listed.extend(u.models.iter().map(|m| lower(m)));
            listed.extend(u.model_limits.keys().map(|m| lower(m)));
        }
        let mut known = listed.clone();
        for t in config.tiers.values() {
            known.extend(t.model_limits.keys().map(|m| lower(m)));
        }
        known.extend(config.prices.keys().filter(|m| *m != "*").map(|m| lower(m)));
        known.extend(
            config
                .max_output_tokens
                .keys()
                .filter(|m| *m != "*")
                .map(|m| lower(m)),
        );
        known.extend(config.model_aliases.values().map(|m| lower(m)));
        known.extend(
            config
                .image_input_tokens
                .keys()
                .filter(|m| *m != "*")
                .map(|m| lower(m)),
        );
        Models {
            known,
            listed,
            strict: config.strict_models,
            aliases: config
                .model_aliases
                .iter()
                .map(|(a, m)| (lower(a), m.trim().to_string()))
                .collect(),
            max_output: config
                .max_output_tokens
                .iter()
                .filter(|(m, _)| *m != "*")
                .map(|(m, n)| (lower(m), *n))
                .collect(),
            default_max_output: config
                .max_output_tokens
                .get("*")
                .copied()
                .unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS),
            image: config
                .image_input_tokens
                .iter()
                .filter(|(m, _)| *m != "*")
                .map(|(m, n)| (lower(m), *n))
                .collect(),
            default_image: config
                .image_input_tokens
                .get("*")
                .copied()
                .unwrap_or(DEFAULT_IMAGE_INPUT_TOKENS),
        }
    }

    /// The configured model `name` (lowercase) is, itself or as a snapshot of it.
    fn known_as(&self, name: &str) -> Option<String> {
        if self.known.contains(name) {
            return Some(name.to_string());
        }
        without_snapshot(name)
            .filter(|base| self.known.contains(*base))
            .map(str::to_string)
    }

    /// The canonical name of `raw`: an alias's model; else the configured model it
    /// names once case is folded, a provider prefix (`openai/`) dropped and a snapshot
    /// date (`-2024-08-06`) seen through; else `raw` in lowercase, sent as written.
    pub(crate) fn resolve(&self, raw: &str) -> Resolved {
        let lower = raw.trim().to_ascii_lowercase();
        if let Some(model) = self.aliases.get(&lower) {
            let folded = model.to_ascii_lowercase();
            return Resolved {
                canonical: self.known_as(&folded).unwrap_or(folded),
                forward: Some(model.clone()),
            };
        }
        let unprefixed = lower.split_once('/').map(|(_, rest)| rest);
        for name in std::iter::once(lower.as_str()).chain(unprefixed) {
            if let Some(canonical) = self.known_as(name) {
                return Resolved {
                    canonical,
                    forward: (name != raw).then(|| name.to_string()),
                };
            }
        }
        Resolved {
            canonical: lower,
            forward: None,
        }
    }

    /// Whether a resolved model may be served: always, unless `strict_models` is set
    /// and no upstream lists it.
    pub(crate) fn served(&self, canonical: &str) -> bool {
        !self.strict || self.listed.contains(canonical)
    }

    /// The most output tokens one answer of `canonical` can hold: the configuration's
    /// figure, else the built-in table's, else the configured (or default) `"*"`.
    pub(crate) fn max_output(&self, canonical: &str) -> u64 {
        self.max_output
            .get(canonical)
            .copied()
            .or_else(|| tollgate::estimate::max_output_tokens(canonical))
            .unwrap_or(self.default_max_output)
    }
}

impl Models {
    /// The most input tokens one image can cost on `canonical`: the configuration's
    /// figure, else gpt-4o-mini's (which bills an image as up to 36,835 tokens, 33 times
    /// gpt-4o's), else the configured (or default) `"*"`.
    pub(crate) fn image_tokens(&self, canonical: &str) -> u64 {
        if let Some(n) = self.image.get(canonical) {
            return *n;
        }
        let mini = canonical
            .strip_prefix("gpt-4o-mini")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'));
        if mini { 36_835 } else { self.default_image }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration's models, with `extra` keys and tables before its upstream.
    fn models(extra: &str) -> Models {
        let src = format!(
            "{extra}\n[upstreams.a]\nkind = \"sim\"\nurl = \"http://127.0.0.1:9\"\nmodels = [\"gpt-4o\", \"gpt-4o-mini\", \"claude-3-5-sonnet\"]\n"
        );
        Models::new(&Config::parse(&src).expect("config"))
    }

    #[test]
    fn spellings_of_one_model_resolve_to_it() {
        let m = models("");
        for raw in [
            "gpt-4o",
            "GPT-4o",
            " gpt-4o ",
            "openai/gpt-4o",
            "gpt-4o-2024-08-06",
            "OpenAI/GPT-4O-2024-08-06",
            "gpt-4o-latest",
        ] {
            assert_eq!(m.resolve(raw).canonical, "gpt-4o", "{raw}");
        }
        assert_eq!(m.resolve("gpt-4o-mini-2024-07-18").canonical, "gpt-4o-mini");
        assert_eq!(
            m.resolve("claude-3-5-sonnet-20241022").canonical,
            "claude-3-5-sonnet"
        );
        for old in ["gpt-4o-0613", "GPT-4o-1106-preview", "gpt-4o-0125"] {
            assert_eq!(m.resolve(old).canonical, "gpt-4o", "{old}");
        }
        // The caller's snapshot goes upstream; only case and prefix are fixed.
        assert_eq!(m.resolve("gpt-4o").forward, None);
        assert_eq!(
            m.resolve("openai/GPT-4o-2024-08-06").forward.as_deref(),
            Some("gpt-4o-2024-08-06")
        );
        // Another model is not a snapshot of a known one.
        assert_eq!(m.resolve("gpt-4o-audio").canonical, "gpt-4o-audio");
        // Unknown names are limited in lowercase and sent as written.
        let r = m.resolve("Meta-Llama/Llama-3-8B");
        assert_eq!(r.canonical, "meta-llama/llama-3-8b");
        assert_eq!(r.forward, None);
    }

    #[test]
    fn a_snapshot_with_its_own_entry_is_its_own_model() {
        let m = models("[prices]\n\"gpt-4o-2024-05-13\" = { input = 5, output = 15 }\n");
        assert_eq!(
            m.resolve("gpt-4o-2024-05-13").canonical,
            "gpt-4o-2024-05-13"
        );
        assert_eq!(m.resolve("gpt-4o-2024-08-06").canonical, "gpt-4o");
    }

    #[test]
    fn aliases_send_their_model() {
        let m = models("[model_aliases]\nfast = \"gpt-4o-mini\"\n");
        let r = m.resolve("FAST");
        assert_eq!(r.canonical, "gpt-4o-mini");
        assert_eq!(r.forward.as_deref(), Some("gpt-4o-mini"));
    }

    #[test]
    fn strict_models_serve_only_listed_ones() {
        let m = models("strict_models = true\n");
        assert!(m.served(&m.resolve("GPT-4o-2024-08-06").canonical));
        assert!(!m.served(&m.resolve("gpt-4.1").canonical));
        assert!(models("").served("anything"));
    }

    #[test]
    fn worst_case_output_comes_from_config_then_table_then_default() {
        let m = models("[max_output_tokens]\n\"gpt-4o\" = 1000\n\"*\" = 2048\n");
        assert_eq!(m.max_output("gpt-4o"), 1000);
        assert_eq!(m.max_output("gpt-4o-mini"), 16_384);
        assert_eq!(m.max_output("my-llama"), 2048);
        assert_eq!(models("").max_output("my-llama"), DEFAULT_MAX_OUTPUT_TOKENS);
    }
}
