//! Text cut to a budget without splitting a character: error messages and log lines kept within a
//! message's size (bytes), lines kept within a page's width (characters).

/// Put where text was cut.
pub const MARK: &str = "…";

/// The longest start of `text` of at most `max_bytes` bytes that ends at a character boundary;
/// all of `text` when it fits.
pub fn head(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The longest end of `text` of at most `max_bytes` bytes that starts at a character boundary;
/// all of `text` when it fits.
pub fn tail(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut start = text.len() - max_bytes;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// The first `max_chars` characters of `text`; all of it when it has no more. For text shown in
/// a fixed width, where a character is what the reader counts.
pub fn head_chars(text: &str, max_chars: usize) -> &str {
    match text.char_indices().nth(max_chars) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

/// `text` when it fits in `max_bytes` bytes, else [`MARK`] and its [`tail`] of `max_bytes` (the
/// mark is not counted). For errors, whose cause comes last.
pub fn tail_marked(text: &str, max_bytes: usize) -> String {
    let kept = tail(text, max_bytes);
    if kept.len() == text.len() {
        text.to_owned()
    } else {
        format!("{MARK}{kept}")
    }
}

/// `text` when it has at most `max_chars` characters, else its first `max_chars` characters and
/// [`MARK`] (the mark is not counted).
pub fn head_chars_marked(text: &str, max_chars: usize) -> String {
    let kept = head_chars(text, max_chars);
    if kept.len() == text.len() {
        text.to_owned()
    } else {
        format!("{kept}{MARK}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // "é" is 2 bytes, "€" 3.

    #[test]
    fn head_never_splits_a_character() {
        assert_eq!(head("aé", 2), "a");
        assert_eq!(head("aé", 3), "aé");
        assert_eq!(head("€b", 1), "");
        assert_eq!(head("€b", 2), "");
        assert_eq!(head("€b", 3), "€");
    }

    #[test]
    fn tail_never_splits_a_character() {
        assert_eq!(tail("éa", 2), "a");
        assert_eq!(tail("éa", 3), "éa");
        assert_eq!(tail("b€", 1), "");
        assert_eq!(tail("b€", 3), "€");
    }

    #[test]
    fn text_that_fits_exactly_is_whole() {
        assert_eq!(head("abc", 3), "abc");
        assert_eq!(tail("abc", 3), "abc");
        assert_eq!(head_chars("aéc", 3), "aéc");
        assert_eq!(tail_marked("abc", 3), "abc");
        assert_eq!(head_chars_marked("aéc", 3), "aéc");
    }

    #[test]
    fn empty_text_and_zero_budgets() {
        assert_eq!(head("", 0), "");
        assert_eq!(tail("", 5), "");
        assert_eq!(head_chars("", 5), "");
        assert_eq!(tail_marked("", 0), "");
        assert_eq!(head("abc", 0), "");
        assert_eq!(tail("abc", 0), "");
        assert_eq!(head_chars("abc", 0), "");
        assert_eq!(tail_marked("abc", 0), "…");
        assert_eq!(head_chars_marked("abc", 0), "…");
    }

    #[test]
    fn head_chars_counts_characters_not_bytes() {
        assert_eq!(head_chars("ééé", 2), "éé");
        assert_eq!(head_chars("€€", 5), "€€");
    }

    #[test]
    fn marks_go_where_text_was_cut() {
        assert_eq!(tail_marked("error: x\ncause é", 8), "…cause é");
        assert_eq!(tail_marked("ab€", 2), "…");
        assert_eq!(head_chars_marked("ééé", 2), "éé…");
    }
}
