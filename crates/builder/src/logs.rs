//! Build log lines: read from nix with bounded memory and made printable ([`RecordLines`],
//! [`printable`]), then batched into `LogBatch` messages ([`LogBatcher`]), so a flood of output
//! becomes a steady stream of bounded messages instead of one message per line.

use std::sync::Arc;
use std::time::Duration;

use homelab_deploy_protocol::subject::encode_host;
use homelab_deploy_protocol::{text, LogBatch};
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use crate::bus::{BusError, LogFence, Publisher};

/// A batch is sent when it holds this many lines…
const MAX_BATCH_LINES: usize = 1000;
/// …or this many bytes…
const MAX_BATCH_BYTES: usize = 128 * 1024;
/// …or its first line is this old.
pub const MAX_BATCH_AGE: Duration = Duration::from_millis(250);

/// Collects one host's log lines and publishes them in numbered batches, each fenced by the
/// request's events ([`Publisher::publish_log`]).
pub struct LogBatcher {
    publisher: Publisher,
    fence: Arc<LogFence>,
    repo: String,
    subject: String,
    request_id: String,
    host: String,
    next_line: u64,
    lines: Vec<String>,
    bytes: usize,
    first_at: Option<Instant>,
}

impl LogBatcher {
    pub fn new(
        publisher: Publisher,
        fence: Arc<LogFence>,
        repo: String,
        subject: String,
        request_id: String,
        host: String,
    ) -> Self {
        Self {
            publisher,
            fence,
            repo,
            subject,
            request_id,
            host,
            next_line: 1,
            lines: Vec::new(),
            bytes: 0,
            first_at: None,
        }
    }

    /// Adds a line; publishes the batch when it is full.
    pub async fn push(&mut self, line: String) -> Result<(), BusError> {
        self.bytes += line.len();
        self.lines.push(line);
        self.first_at.get_or_insert_with(Instant::now);
        if self.lines.len() >= MAX_BATCH_LINES || self.bytes >= MAX_BATCH_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    /// Lines published (and stored) so far: the host's lines are numbered 1 to this.
    pub fn lines_published(&self) -> u64 {
        self.next_line - 1
    }

    /// When the pending batch must go out even if no more lines come.
    pub fn deadline(&self) -> Option<Instant> {
        self.first_at.map(|first| first + MAX_BATCH_AGE)
    }

    pub async fn flush(&mut self) -> Result<(), BusError> {
        if self.lines.is_empty() {
            return Ok(());
        }
        let lines = std::mem::take(&mut self.lines);
        // A batch over the server's max_payload goes out in parts, each a batch of its own.
        let max = self.publisher.max_body_bytes();
        let mut parts = vec![lines];
        while let Some(mut lines) = parts.pop() {
            let count = lines.len() as u64;
            let mut batch = LogBatch {
                id: self.request_id.clone(),
                host: self.host.clone(),
                first_line: self.next_line,
                lines: Vec::new(),
                time: OffsetDateTime::now_utc(),
            };
            let fixed = LOG_BATCH_OVERHEAD + batch.id.len() + batch.host.len();
            let raw: usize = lines.iter().map(|line| line.len() + 3).sum();
            // JSON escaping makes a byte at most 6 (`\u0000`): only measure when it could matter.
            let size = if fixed + 6 * raw <= max {
                fixed + raw
            } else {
                fixed
                    + lines
                        .iter()
                        .map(|line| {
                            serde_json::to_string(line).map_or(line.len(), |json| json.len() + 1)
                        })
                        .sum::<usize>()
            };
            if size > max && lines.len() > 1 {
                let second = lines.split_off(lines.len() / 2);
                parts.push(second);
                parts.push(lines);
                continue;
            }
            if size > max {
                // One line alone is too large: keep its start, escaped at most 6 bytes a byte.
                if let Some(line) = lines.first_mut() {
                    let budget = max.saturating_sub(LOG_BATCH_OVERHEAD + 64) / 6;
                    line.truncate(text::head(line, budget).len());
                    line.push_str("…[line cut]");
                }
            }
            batch.lines = lines;
            // The host's token: a header value holds no newline, and no `.` makes two ids alike.
            // The writer keeps another attempt's batch of the same lines from being taken for
            // a copy of this one.
            let message_id = format!(
                "{}.log.{}.{}.{}",
                self.request_id,
                encode_host(&self.host),
                self.next_line,
                self.fence.writer()
            );
            let payload = serde_json::to_vec(&batch).map_err(|err| BusError::Publish {
                subject: self.subject.clone(),
                attempts: 0,
                message: err.to_string(),
            })?;
            self.publisher
                .publish_log(&self.subject, &message_id, payload.into(), &self.fence)
                .await?;
            // A batch id already stored means this batch was stored before; nothing is lost.
            self.next_line += count;
        }
        crate::metrics::log_bytes(&self.repo, self.bytes as u64);
        self.bytes = 0;
        self.first_at = None;
        Ok(())
    }
}

/// JSON of a log batch besides its lines, id and host (field names, line number, time).
const LOG_BATCH_OVERHEAD: usize = 128;

/// Longest log line kept, in bytes of printable text; the rest of a longer line is dropped and
/// marked with [`CUT_MARK`].
pub const MAX_LINE_BYTES: usize = 8 * 1024;
/// Ends a line that was cut.
pub const CUT_MARK: &str = " …[line cut]";
/// Raw bytes kept of one string value inside an internal-json record. Escapes take up to six
/// bytes per character (`\u0000`), so this is more than [`MAX_LINE_BYTES`].
const MAX_JSON_STRING_BYTES: usize = 4 * MAX_LINE_BYTES;
/// Most bytes kept of one internal-json record, string values included. A record past this is
/// shown as cut text instead of decoded.
const MAX_RECORD_BYTES: usize = 16 * MAX_LINE_BYTES;
/// How nix's `--log-format internal-json` marks a record.
const RECORD_PREFIX: &[u8] = b"@nix ";

/// One line of a pipe, read with bounded memory whatever its length.
#[derive(Debug, PartialEq, Eq)]
pub enum RawLine {
    /// An internal-json record, still JSON (after [`RECORD_PREFIX`]): each string value longer
    /// than the bound was cut inside the string, at a character and escape boundary, and ends in
    /// [`CUT_MARK`], so the record stays decodable. Bytes that are not UTF-8 are written as the
    /// text `\xNN`.
    Record(String),
    /// Any other line, printable ([`printable`]) and cut to [`MAX_LINE_BYTES`].
    Text(String),
}

/// Splits a pipe into lines holding at most one bounded line in memory. A line that starts with
/// `@nix ` is scanned as JSON while it is read: a string value (a 100 MB build log line arrives
/// as one) keeps only its first bytes, so the record is decoded first and its text cut after,
/// instead of cutting the JSON text and losing the record. Written here because no JSON library
/// bounds the length of a string value it reads.
pub struct RecordLines<R> {
    reader: R,
    buffer: Vec<u8>,
    start: usize,
    eof: bool,
}

impl<R: AsyncRead + Unpin> RecordLines<R> {
    pub fn new(reader: R) -> Self {
        Self {
            reader,
            buffer: Vec::new(),
            start: 0,
            eof: false,
        }
    }

    /// The next line; `None` at the end of the pipe (or on a read error, which ends it too).
    pub async fn next_line(&mut self) -> Option<RawLine> {
        let mut line = LineScanner::default();
        loop {
            let rest = &self.buffer[self.start..];
            if let Some(newline) = rest.iter().position(|b| *b == b'\n') {
                line.feed(&rest[..newline]);
                self.start += newline + 1;
                return Some(line.finish());
            }
            line.feed(rest);
            self.buffer.clear();
            self.start = 0;
            if self.eof {
                return (!line.is_empty()).then(|| line.finish());
            }
            self.buffer.resize(64 * 1024, 0);
            match self.reader.read(&mut self.buffer).await {
                Ok(0) | Err(_) => {
                    self.buffer.clear();
                    self.eof = true;
                }
                Ok(read) => self.buffer.truncate(read),
            }
        }
    }
}

/// Where a [`LineScanner`] is inside a JSON record.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Json {
    #[default]
    Outside,
    /// Inside a string value.
    String,
    /// Just after a backslash in a string.
    Escape,
    /// In the hex digits of a `\u` escape, this many left.
    Hex(u8),
}

/// Bytes of one line, fed as they come; keeps what [`RawLine`] promises.
#[derive(Debug, Default)]
struct LineScanner {
    kept: Vec<u8>,
    /// Whether the line is an internal-json record (known once its prefix has arrived).
    record: Option<bool>,
    /// Bytes of a text line dropped, or the record given up (then shown as cut text).
    cut: bool,
    json: Json,
    /// Of the string being read: bytes kept, bytes dropped, whether its current character or
    /// escape is kept, the hex value of its `\u` escape, and whether that was a high surrogate
    /// (whose low half must then be kept too).
    string_kept: usize,
    string_dropped: bool,
    keeping: bool,
    hex: u32,
    high_surrogate: bool,
}

impl LineScanner {
    fn is_empty(&self) -> bool {
        self.kept.is_empty() && !self.cut
    }

    /// Takes the next bytes of the line. Runs of plain bytes (a text line, or the inside of a
    /// string value) are copied or skipped whole; only JSON's framing and escapes go byte by
    /// byte.
    fn feed(&mut self, mut bytes: &[u8]) {
        while let Some(&first) = bytes.first() {
            match (self.record, self.json) {
                (Some(false), _) => {
                    let room = MAX_LINE_BYTES.saturating_sub(self.kept.len());
                    let take = room.min(bytes.len());
                    self.kept.extend_from_slice(&bytes[..take]);
                    self.cut |= take < bytes.len();
                    return;
                }
                (Some(true), _) if self.cut => return,
                (Some(true), Json::String) if first != b'"' && first != b'\\' => {
                    let run = bytes
                        .iter()
                        .position(|byte| *byte == b'"' || *byte == b'\\')
                        .unwrap_or(bytes.len());
                    self.keep_run(&bytes[..run]);
                    bytes = &bytes[run..];
                }
                _ => {
                    self.push(first);
                    bytes = &bytes[1..];
                }
            }
        }
    }

    /// Characters of a string value without quotes or escapes: kept while the string has room
    /// (a character whose first byte fits is kept whole), the rest dropped.
    fn keep_run(&mut self, run: &[u8]) {
        let continuation = |byte: &u8| byte & 0xC0 == 0x80;
        // Bytes that finish a character begun in the previous read follow its fate.
        let carried = run.iter().take_while(|byte| continuation(byte)).count();
        let (carried, run) = run.split_at(carried);
        if self.keeping {
            self.keep_slice(carried);
        }
        if run.is_empty() {
            return;
        }
        self.high_surrogate = false;
        let room = MAX_JSON_STRING_BYTES.saturating_sub(self.string_kept);
        let mut take = room.min(run.len());
        while take < run.len() && continuation(&run[take]) {
            take += 1;
        }
        self.keep_slice(&run[..take]);
        self.keeping = take == run.len();
        self.string_dropped |= take < run.len();
    }

    fn keep_slice(&mut self, bytes: &[u8]) {
        self.string_kept += bytes.len();
        if self.kept.len() + bytes.len() <= MAX_RECORD_BYTES {
            self.kept.extend_from_slice(bytes);
        } else {
            self.cut = true;
        }
    }

    fn push(&mut self, byte: u8) {
        match self.record {
            None => {
                self.kept.push(byte);
                if self.kept.len() == RECORD_PREFIX.len() {
                    self.record = Some(self.kept == RECORD_PREFIX);
                }
            }
            Some(false) => {
                if self.kept.len() < MAX_LINE_BYTES {
                    self.kept.push(byte);
                } else {
                    self.cut = true;
                }
            }
            Some(true) if self.cut => {}
            Some(true) => self.push_json(byte),
        }
    }

    fn push_json(&mut self, byte: u8) {
        match self.json {
            Json::Outside => {
                if byte == b'"' {
                    self.json = Json::String;
                    self.string_kept = 0;
                    self.string_dropped = false;
                    self.high_surrogate = false;
                }
                self.keep(byte);
            }
            Json::String => {
                if byte == b'"' {
                    if self.string_dropped {
                        self.kept.extend_from_slice(CUT_MARK.as_bytes());
                    }
                    self.json = Json::Outside;
                    self.keep(byte);
                    return;
                }
                let continuation = byte & 0xC0 == 0x80;
                if !continuation {
                    // A new character or escape starts: keep it only while there is room (or
                    // when it is the low half of a kept surrogate pair).
                    self.keeping = self.string_kept < MAX_JSON_STRING_BYTES
                        || (byte == b'\\' && self.high_surrogate);
                    self.high_surrogate = false;
                }
                if byte == b'\\' {
                    self.json = Json::Escape;
                }
                self.keep_in_string(byte);
            }
            Json::Escape => {
                self.json = if byte == b'u' {
                    self.hex = 0;
                    Json::Hex(4)
                } else {
                    Json::String
                };
                self.keep_in_string(byte);
            }
            Json::Hex(left) => {
                let digit = char::from(byte).to_digit(16).unwrap_or(0);
                self.hex = self.hex * 16 + digit;
                self.json = if left > 1 {
                    Json::Hex(left - 1)
                } else {
                    self.high_surrogate = self.keeping && (0xD800..0xDC00).contains(&self.hex);
                    Json::String
                };
                self.keep_in_string(byte);
            }
        }
    }

    fn keep_in_string(&mut self, byte: u8) {
        if self.keeping {
            self.string_kept += 1;
            self.keep(byte);
        } else {
            self.string_dropped = true;
        }
    }

    fn keep(&mut self, byte: u8) {
        if self.kept.len() < MAX_RECORD_BYTES {
            self.kept.push(byte);
        } else {
            self.cut = true;
        }
    }

    fn finish(self) -> RawLine {
        let complete = self.record == Some(true) && !self.cut && self.json == Json::Outside;
        if complete {
            let json = &self.kept[RECORD_PREFIX.len()..];
            return RawLine::Record(escape_invalid_utf8(json, "\\\\x"));
        }
        let mut text = escape_invalid_utf8(&self.kept, "\\x");
        if text.ends_with('\r') {
            text.pop();
        }
        let text = printable(&text);
        let long = self.cut || text.len() > MAX_LINE_BYTES;
        RawLine::Text(cut_to(text, MAX_LINE_BYTES, long))
    }
}

/// `bytes` as text, each byte that is not part of valid UTF-8 written as `prefix` and two hex
/// digits.
fn escape_invalid_utf8(bytes: &[u8], prefix: &str) -> String {
    let mut text = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        text.push_str(chunk.valid());
        for byte in chunk.invalid() {
            text.push_str(&format!("{prefix}{byte:02x}"));
        }
    }
    text
}

/// `text` with terminal escape sequences removed and every other control character (tab aside)
/// written as `\xNN` (or `\u{N}`), so a NUL or a carriage return is seen, not obeyed.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI and similar sequences end at their first letter.
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            '\t' => out.push(c),
            c if c.is_control() && u32::from(c) < 0x100 => {
                out.push_str(&format!("\\x{:02x}", u32::from(c)));
            }
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

/// `line` cut to [`MAX_LINE_BYTES`] (at a character boundary) and marked, when it is longer.
pub fn cut_line(line: String) -> String {
    let long = line.len() > MAX_LINE_BYTES;
    cut_to(line, MAX_LINE_BYTES, long)
}

fn cut_to(mut line: String, max: usize, mark: bool) -> String {
    line.truncate(text::head(&line, max).len());
    if mark && !line.ends_with(CUT_MARK) {
        line.push_str(CUT_MARK);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8]) -> Vec<RawLine> {
        let mut reader = RecordLines::new(input);
        let mut lines = Vec::new();
        while let Some(line) = reader.next_line().await {
            lines.push(line);
        }
        lines
    }

    /// A long plain line is cut and marked; the lines after it are whole.
    #[tokio::test]
    async fn long_text_lines_are_cut() {
        let mut input = vec![b'x'; 1024 * 1024];
        input.extend_from_slice(b"\nshort\r\nlast");
        let lines = lines(&input).await;
        let RawLine::Text(first) = &lines[0] else {
            panic!("{:?}", &lines[0]);
        };
        assert_eq!(first.len(), MAX_LINE_BYTES + CUT_MARK.len());
        assert!(first.ends_with(CUT_MARK));
        assert_eq!(
            lines[1..],
            [RawLine::Text("short".into()), RawLine::Text("last".into())]
        );
    }

    /// A record whose string value is far over the bound stays valid JSON: the string is cut at
    /// a character boundary, never inside an escape or a surrogate pair, and marked.
    #[tokio::test]
    async fn long_records_stay_decodable() {
        for unit in ["é", "\\u0000", "\\ud83d\\ude00", "\\\"", "a"] {
            let mut input = b"@nix {\"fields\":[\"".to_vec();
            for _ in 0..(MAX_JSON_STRING_BYTES + 7) {
                input.extend_from_slice(unit.as_bytes());
            }
            input.extend_from_slice(b"\"],\"type\":101}\n");
            let lines = lines(&input).await;
            let [RawLine::Record(json)] = &lines[..] else {
                panic!("{unit}: {lines:?}");
            };
            let value: serde_json::Value =
                serde_json::from_str(json).unwrap_or_else(|err| panic!("{unit}: {err}"));
            assert_eq!(value["type"], 101);
            let text = value["fields"][0].as_str().expect("text");
            assert!(text.ends_with(CUT_MARK), "{unit}");
            assert!(
                json.len() < MAX_JSON_STRING_BYTES + 100,
                "{unit}: {}",
                json.len()
            );
        }
    }

    /// Control characters are shown escaped, terminal colours are dropped.
    #[test]
    fn text_is_made_printable() {
        assert_eq!(
            printable("a\u{0}b\rc\u{1b}[31mred\u{1b}[0m\td\u{85}"),
            "a\\x00b\\x0dcred\td\\x85"
        );
    }
}
