//! A line diff that shows whitespace: `·` for spaces, `→` for tabs, `⏎` at each line end.

use kiln_img::Output;

/// Makes spaces, tabs and the line end visible.
pub fn visible(line: &str) -> String {
    let mut s: String = line
        .chars()
        .map(|c| match c {
            ' ' => '·',
            '\t' => '→',
            c => c,
        })
        .collect();
    s.push('⏎');
    s
}

/// Longest-common-subsequence line diff of `a` (kiln) against `b` (qemu-img); at most
/// `limit` changed lines are shown.
pub fn line_diff(a: &str, b: &str, limit: usize) -> String {
    labeled_line_diff(a, b, limit, ("kiln", "qemu-img"))
}

/// [`line_diff`] with the two sides named `labels` (`-` lines are the first side's).
pub fn labeled_line_diff(a: &str, b: &str, limit: usize, labels: (&str, &str)) -> String {
    let width = labels.0.chars().count().max(labels.1.chars().count());
    let (la, lb) = (
        format!("{:<width$}", labels.0),
        format!("{:<width$}", labels.1),
    );
    let a: Vec<&str> = a.split_inclusive('\n').collect();
    let b: Vec<&str> = b.split_inclusive('\n').collect();
    let strip = |l: &str| l.strip_suffix('\n').map(str::to_owned);
    let show = |l: &str| match strip(l) {
        Some(x) => visible(&x),
        None => format!("{l}(no newline)"),
    };
    // Outputs are small (a few thousand lines at most); fall back to a plain listing beyond.
    if a.len() * b.len() > 4_000_000 {
        return format!(
            "    (outputs too large to diff: {} vs {} lines)\n",
            a.len(),
            b.len()
        );
    }
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut shown) = (0, 0, 0);
    let mut out = String::new();
    while (i < a.len() || j < b.len()) && shown < limit {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push_str(&format!("    + {lb} {}\n", show(b[j])));
            j += 1;
            shown += 1;
        } else {
            out.push_str(&format!("    - {la} {}\n", show(a[i])));
            i += 1;
            shown += 1;
        }
    }
    if shown >= limit {
        out.push_str("    …\n");
    }
    out
}

/// The diff of two outputs: exit codes, stdout, stderr.
pub fn visible_diff(kiln: &Output, qemu: &Output) -> String {
    let mut s = String::new();
    if kiln.code != qemu.code {
        s.push_str(&format!(
            "    exit code: kiln {} vs qemu-img {}\n",
            kiln.code, qemu.code
        ));
    }
    if kiln.stdout != qemu.stdout {
        s.push_str("    stdout:\n");
        s.push_str(&line_diff(&kiln.stdout, &qemu.stdout, 20));
    }
    if kiln.stderr != qemu.stderr {
        s.push_str("    stderr:\n");
        s.push_str(&line_diff(&kiln.stderr, &qemu.stderr, 10));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_space_is_visible() {
        let d = line_diff("a\nb \n", "a\nb\n", 10);
        assert_eq!(d, "    + qemu-img b⏎\n    - kiln     b·⏎\n");
    }

    #[test]
    fn missing_newline_is_visible() {
        let d = line_diff("x", "x\n", 10);
        assert!(d.contains("x⏎") && d.contains("x(no newline)"), "{d}");
    }
}
