//! Plain aligned tables for humans.

use nembo_proto::v1 as pb;

/// Prints rows under headers, columns padded to their widest cell. Cells
/// are shown with their control characters escaped: a job name holding a
/// newline or a terminal escape must not fake rows or drive the reader's
/// terminal.
pub fn print(headers: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| visible(c)).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

/// `s` with every control character (C0, DEL, C1) and bidirectional
/// override written as a visible escape (`\x1b`, `\n`, `\u{202e}`).
pub fn visible(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {
                out.push_str(&format!("\\u{{{:04x}}}", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

/// `1h2m`, `3m4s`, `5s`.
pub fn duration(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let s = ms / 1000;
    match s {
        0..=9 => format!("{:.1}s", ms as f64 / 1000.0),
        10..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

/// How long ago a Unix-ms time was.
pub fn ago(at_ms: i64) -> String {
    if at_ms <= 0 {
        return "-".into();
    }
    format!("{} ago", duration(nembo_proto::clock::now_ms() - at_ms))
}

/// `region` or `region/zone`.
pub fn region_cell(o: &pb::Offering) -> String {
    if o.zone.is_empty() {
        o.region.clone()
    } else {
        format!("{}/{}", o.region, o.zone)
    }
}

/// `H100:8`, or `-` for none.
pub fn gpus_cell(name: &str, count: f64) -> String {
    if name.is_empty() {
        "-".into()
    } else {
        format!("{name}:{count}")
    }
}

/// `cell`, marked when what it shows does not exist.
pub fn simulated(cell: String, simulated: bool) -> String {
    if simulated {
        format!("{cell} {SIMULATED}")
    } else {
        cell
    }
}

/// The mark of a simulated shape or node.
pub const SIMULATED: &str = "(simulated)";

/// Says what the mark means, under a table that shows it.
pub fn explain_simulated(any: bool) {
    if any {
        println!(
            "\n{SIMULATED}: made-up shapes (the local provider's `simulate: true`, or a \
             simulated cloud) for tests and demos; their GPUs do not exist."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        assert_eq!(visible("train"), "train");
        assert_eq!(visible("a\nb"), "a\\nb");
        assert_eq!(visible("\x1b[31mred\x07"), "\\x1b[31mred\\x07");
        assert_eq!(visible("evil\u{202e}txt"), "evil\\u{202e}txt");
        assert_eq!(visible("\u{9b}"), "\\x9b");
        assert_eq!(visible("Zürich 東京"), "Zürich 東京");
    }
}
