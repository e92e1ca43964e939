//! A cheap look at how deeply a task's flow collections nest, before the
//! YAML parser sees it. The parser refuses anything deeper than 128 levels,
//! but only after it has scanned the whole document, which takes time
//! quadratic in the depth: 100 000 `[` in a 200 KB task kept a coordinator
//! busy for 43 s. This linear pass refuses such a task at once.
//!
//! It follows just enough of YAML to count only real collection starts:
//! quoted scalars, comments and block scalars (`|`, `>`) are skipped, and
//! outside a flow collection a `[` or `{` counts only where a value starts.

use super::{Result, SpecError};

/// The deepest nesting of flow collections (`[` and `{`) the parser takes.
pub const MAX_FLOW_DEPTH: usize = 128;

/// Refuses `yaml` if its flow collections nest deeper than [`MAX_FLOW_DEPTH`].
pub(super) fn check_flow_depth(yaml: &str) -> Result<()> {
    let depth = max_flow_depth(yaml, MAX_FLOW_DEPTH + 1);
    if depth > MAX_FLOW_DEPTH {
        return Err(SpecError::new(
            "task",
            format!("invalid YAML: collections nest deeper than {MAX_FLOW_DEPTH} levels"),
        ));
    }
    Ok(())
}

/// How deeply flow collections nest in `yaml`, counting no further than
/// `stop`.
fn max_flow_depth(yaml: &str, stop: usize) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    // Indentation of the line that opened a block scalar: more-indented
    // lines (and blank ones) are its content.
    let mut block_scalar: Option<usize> = None;
    for line in yaml.lines() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        if let Some(opener) = block_scalar {
            if line.trim().is_empty() || indent > opener {
                continue;
            }
            block_scalar = None;
        }
        let bytes = line.as_bytes();
        let mut i = indent;
        // Where a value may start: after indentation, `- `, `: `, `? `, `,`.
        let mut value_start = true;
        while i < bytes.len() {
            let c = bytes[i];
            match c {
                b'#' if i == 0 || bytes[i - 1] == b' ' || bytes[i - 1] == b'\t' => break,
                b'\'' | b'"' if depth > 0 || value_start => {
                    i = skip_quoted(bytes, i);
                    value_start = false;
                    continue;
                }
                b'[' | b'{' if depth > 0 || value_start => {
                    depth += 1;
                    deepest = deepest.max(depth);
                    if deepest >= stop {
                        return deepest;
                    }
                    value_start = true;
                }
                b']' | b'}' if depth > 0 => {
                    depth -= 1;
                    value_start = false;
                }
                b',' if depth > 0 => value_start = true,
                b'|' | b'>' if depth == 0 && value_start => {
                    block_scalar = Some(indent);
                    break;
                }
                b' ' | b'\t' => {}
                b'-' | b':' | b'?'
                    if bytes.get(i + 1).is_none_or(|n| *n == b' ' || *n == b'\t') =>
                {
                    value_start = true;
                }
                _ => value_start = false,
            }
            i += 1;
        }
    }
    deepest
}

/// The index just past the quoted scalar starting at `start` (or the end of
/// the line: a quoted scalar going on to the next line hides no collection
/// start the parser would count, so the rest of it is read as plain text).
fn skip_quoted(bytes: &[u8], start: usize) -> usize {
    let quote = bytes[start];
    let mut i = start + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if quote == b'"' => i += 2,
            b'\'' if quote == b'\'' && bytes.get(i + 1) == Some(&b'\'') => i += 2,
            c if c == quote => return i + 1,
            _ => i += 1,
        }
    }
    bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_real_collection_starts_count() {
        assert_eq!(max_flow_depth("envs: [[1, [2]], {a: [3]}]", 999), 3);
        assert_eq!(max_flow_depth("run: echo [[[ x", 999), 0);
        assert_eq!(max_flow_depth("run: \"[[[[\"\nx: '[[['", 999), 0);
        assert_eq!(max_flow_depth("a: 1 # [[[[\nb: [1]", 999), 1);
        assert_eq!(
            max_flow_depth("run: |\n  [[ -f x ]] && echo [[[[\n  {{{\nenvs: [a]\n", 999),
            1
        );
        assert_eq!(max_flow_depth("- [[1]]\n- {a: {b: 1}}", 999), 2);
        assert_eq!(max_flow_depth("x: ['a]', \"b}\"]", 999), 1);
    }

    #[test]
    fn a_deep_task_is_refused_at_once_and_a_legal_one_is_not() {
        let bomb = format!("run: x\nenvs: {}", "[".repeat(100_000));
        let e = check_flow_depth(&bomb).unwrap_err();
        assert!(e.to_string().contains("deeper than 128"), "{e}");
        let deep_but_legal = format!(
            "run: x\nlabels: {{a: {}1{}}}",
            "[".repeat(MAX_FLOW_DEPTH - 1),
            "]".repeat(MAX_FLOW_DEPTH - 1)
        );
        assert!(check_flow_depth(&deep_but_legal).is_ok());
    }
}
