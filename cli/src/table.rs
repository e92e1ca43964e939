//! Plain aligned tables for humans.

use nembo_proto::v1 as pb;

/// Prints rows under headers, columns padded to their widest cell.
pub fn print(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
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
        line(r.clone());
    }
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
