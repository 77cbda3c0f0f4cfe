//! An incremental parser for server-sent events (`text/event-stream`), as providers
//! stream completions.
//!
//! Bytes go in as they arrive from the network, in chunks cut anywhere; whole events
//! come out as soon as their blank line arrives, each with its exact raw bytes (to pass
//! on unchanged) and its `event:` and `data:` fields (to read usage from). It never
//! panics on any input and never holds more than [`MAX_EVENT`] bytes of one event. This
//! module knows nothing of HTTP or of what the events mean.
//!
//! ```
//! use tollgate_gateway::sse::Parser;
//! let mut p = Parser::new();
//! assert!(p.push(b"data: {\"a\":").unwrap().is_empty());     // not whole yet
//! let events = p.push(b"1}\n\ndata: [DONE]\n\n").unwrap();
//! assert_eq!(events.len(), 2);
//! assert_eq!(events[0].data, "{\"a\":1}");
//! assert_eq!(&events[0].raw[..], b"data: {\"a\":1}\n\n");
//! assert_eq!(events[1].data, "[DONE]");
//! ```

use bytes::{Bytes, BytesMut};

/// The largest event the parser holds (16 MiB): a stream sending more without a blank
/// line is broken or hostile.
pub const MAX_EVENT: usize = 16 << 20;

/// One whole event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Its bytes as received, blank line included.
    pub raw: Bytes,
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n` (empty when there is none).
    pub data: String,
}

/// An event longer than [`MAX_EVENT`].
///
/// ```
/// let mut p = tollgate_gateway::sse::Parser::new();
/// let big = vec![b'x'; tollgate_gateway::sse::MAX_EVENT + 1];
/// assert!(p.push(&big).is_err());
/// ```
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("an event of the upstream's stream is longer than {max} bytes")]
pub struct TooLong {
    /// The limit.
    pub max: usize,
}

/// The parser's state: the bytes of the event not yet whole.
///
/// ```
/// let p = tollgate_gateway::sse::Parser::new();
/// assert_eq!(p.pending(), 0);
/// ```
#[derive(Debug, Default)]
pub struct Parser {
    buf: BytesMut,
    /// Where to resume looking for line ends.
    scan: usize,
    /// Where the current line starts.
    line: usize,
}

impl Parser {
    /// An empty parser.
    ///
    /// ```
    /// let _p = tollgate_gateway::sse::Parser::new();
    /// ```
    pub fn new() -> Parser {
        Parser::default()
    }

    /// Bytes held of an event not yet whole.
    ///
    /// ```
    /// let mut p = tollgate_gateway::sse::Parser::new();
    /// p.push(b"data: x").unwrap();
    /// assert_eq!(p.pending(), 7);
    /// ```
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Feed the next bytes; returns the events they complete, in order.
    ///
    /// # Errors
    ///
    /// [`TooLong`] when an event grows past [`MAX_EVENT`]; the parser is then empty.
    ///
    /// ```
    /// let mut p = tollgate_gateway::sse::Parser::new();
    /// let e = p.push(b"event: message_stop\r\ndata: {}\r\n\r\n").unwrap();
    /// assert_eq!(e[0].event.as_deref(), Some("message_stop"));
    /// ```
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Event>, TooLong> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        loop {
            let bytes = &self.buf[..];
            let Some(rel) = bytes[self.scan..]
                .iter()
                .position(|&b| b == b'\n' || b == b'\r')
            else {
                self.scan = bytes.len();
                break;
            };
            let at = self.scan + rel;
            // A line ends at \n, \r\n or \r; a \r last in the buffer may still be \r\n.
            let end = if bytes[at] == b'\r' {
                match bytes.get(at + 1) {
                    None => {
                        self.scan = at;
                        break;
                    }
                    Some(b'\n') => at + 2,
                    Some(_) => at + 1,
                }
            } else {
                at + 1
            };
            let empty = at == self.line;
            self.scan = end;
            self.line = end;
            if empty {
                let raw = self.buf.split_to(end).freeze();
                self.scan = 0;
                self.line = 0;
                out.push(parse(raw));
            }
        }
        if self.buf.len() > MAX_EVENT {
            *self = Parser::new();
            return Err(TooLong { max: MAX_EVENT });
        }
        Ok(out)
    }

    /// The end of the stream: whatever is held, as a last event (a stream may end
    /// without the final blank line), so no byte is lost.
    ///
    /// ```
    /// let mut p = tollgate_gateway::sse::Parser::new();
    /// p.push(b"data: last").unwrap();
    /// assert_eq!(p.finish().unwrap().data, "last");
    /// assert!(tollgate_gateway::sse::Parser::new().finish().is_none());
    /// ```
    pub fn finish(self) -> Option<Event> {
        if self.buf.is_empty() {
            return None;
        }
        Some(parse(self.buf.freeze()))
    }
}

/// Read an event's fields from its raw bytes.
fn parse(raw: Bytes) -> Event {
    let text = String::from_utf8_lossy(&raw);
    let mut event = None;
    let mut data: Option<String> = None;
    for line in text.split(['\n', '\r']) {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_string()),
            },
            "event" => event = Some(value.to_string()),
            _ => {}
        }
    }
    Event {
        raw,
        event,
        data: data.unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_at_once(input: &[u8]) -> Vec<Event> {
        let mut p = Parser::new();
        let mut v = p.push(input).expect("small");
        v.extend(p.finish());
        v
    }

    #[test]
    fn any_split_gives_the_same_events_and_bytes() {
        let input: &[u8] =
            b": keep-alive\n\nevent: a\ndata: 1\ndata: 2\n\ndata: x\r\n\r\ndata: y\r\rdata: tail";
        let whole = all_at_once(input);
        assert_eq!(whole.len(), 5);
        assert_eq!(whole[1].data, "1\n2");
        assert_eq!(whole[1].event.as_deref(), Some("a"));
        assert_eq!(whole[4].data, "tail");
        for cut in 0..input.len() {
            for cut2 in cut..input.len() {
                let mut p = Parser::new();
                let mut got = p.push(&input[..cut]).expect("small");
                got.extend(p.push(&input[cut..cut2]).expect("small"));
                got.extend(p.push(&input[cut2..]).expect("small"));
                got.extend(p.finish());
                assert_eq!(got, whole, "cut at {cut}, {cut2}");
            }
        }
        let raw: Vec<u8> = whole.iter().flat_map(|e| e.raw.to_vec()).collect();
        assert_eq!(raw, input, "the raw bytes are passed on unchanged");
    }

    #[test]
    fn byte_by_byte() {
        let input = b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n";
        let mut p = Parser::new();
        let mut got = Vec::new();
        for b in input {
            got.extend(p.push(&[*b]).expect("small"));
        }
        assert_eq!(got.len(), 2);
        assert!(p.finish().is_none());
    }
}
