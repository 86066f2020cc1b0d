//! Text from devices and the cloud on an admin's terminal: model names, firmware versions, task
//! names, reasons and error messages are foreign input. Shown raw, an escape sequence in one of
//! them could rewrite the screen, hide a line or fake one. [`printable`] makes every character
//! that is not plain visible text visible as an escape instead.

use std::borrow::Cow;

/// `s` with control characters (C0, DEL, C1) and the invisible characters that reorder or hide
/// text (bidirectional overrides and isolates, zero-width characters, line and paragraph
/// separators) written as escapes: `\n`, `\t`, `\r`, `\u{1b}`. Borrowed when nothing needs it.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if needs_escape(c) => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// [`printable`] for a whole text shown as lines (a device's configuration export): newlines and
/// tabs stay what they are, every other control or hiding character is escaped.
pub fn printable_lines(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c != '\n' && c != '\t' && needs_escape(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            c if needs_escape(c) => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200b}'..='\u{200f}'     // zero-width space/joiners, LRM, RLM
            | '\u{2028}' | '\u{2029}'   // line and paragraph separators
            | '\u{202a}'..='\u{202e}'   // bidi embeddings and overrides
            | '\u{2060}'..='\u{2064}'   // word joiner, invisible operators
            | '\u{2066}'..='\u{2069}'   // bidi isolates
            | '\u{feff}'                // zero-width no-break space
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_become_visible_plain_text_stays() {
        assert!(matches!(printable("VVX 411 5.9.6"), Cow::Borrowed(_)));
        assert_eq!(printable("été ☎"), "été ☎");
        assert_eq!(
            printable("VVX\u{1b}[2J\u{1b}]0;owned\u{7}"),
            "VVX\\u{1b}[2J\\u{1b}]0;owned\\u{7}"
        );
        assert_eq!(printable("a\nb\tc\rd"), "a\\nb\\tc\\rd");
        assert_eq!(printable("x\u{9b}31m"), "x\\u{9b}31m");
        assert_eq!(printable("abc\u{202e}fed"), "abc\\u{202e}fed");
        assert_eq!(printable("\u{7f}"), "\\u{7f}");
        assert_eq!(
            printable_lines("a=\"1\"\n\tb=\"\u{1b}[2J\"\r\n"),
            "a=\"1\"\n\tb=\"\\u{1b}[2J\"\\u{d}\n"
        );
    }
}
