//! `tartanctl` subcommands, one file each.

pub mod dns;
pub mod explain;
pub mod ingress;
pub mod network;
pub mod node;
pub mod nodes;
pub mod service;

/// A command-line parse error as one line (clap's own rendering spans several, with usage
/// and tips); `None` for `--help` and `--version`, which clap prints itself.
pub fn clap_error_line(e: &clap::Error) -> Option<String> {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        return None;
    }
    let text = e.render().to_string();
    let parts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
        .collect();
    let line = parts.join(" ");
    let line = line.strip_prefix("error: ").unwrap_or(&line);
    Some(format!("{line} (see --help)"))
}

/// Output format for listing commands.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// Aligned columns for people.
    #[default]
    Table,
    /// JSON for programs.
    Json,
}

/// The widest a table cell is shown; longer text (e.g. from a hand-written etcd record) is
/// cut and ends in `…`.
pub const MAX_CELL: usize = 120;

/// At most `max` characters of `s`, ending in `…` when it was cut.
pub fn cap_text(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
    t.push('…');
    t
}

/// Joins the first `max` items with `sep` and says how many more there are.
pub fn join_capped(items: impl ExactSizeIterator<Item = String>, sep: &str, max: usize) -> String {
    let n = items.len();
    let mut out: Vec<String> = items.take(max).collect();
    if n > max {
        out.push(format!("… (+{} more)", n - max));
    }
    out.join(sep)
}

/// Renders rows as aligned columns under `header`; cells are cut at [`MAX_CELL`]
/// characters.
pub fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| cap_text(c, MAX_CELL)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let n = cells.len();
        for (i, c) in cells.into_iter().enumerate() {
            if i + 1 == n {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        while out.ends_with(' ') {
            out.pop();
        }
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for r in &rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_aligns() {
        let t = super::render_table(
            &["A", "BB"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    BB\nxyz  1\nq    22\n");
    }

    #[test]
    fn clap_errors_become_one_line() {
        use clap::Parser;
        #[derive(clap::Parser, Debug)]
        struct T {
            #[arg(long)]
            cidr: ipnetwork::Ipv4Network,
        }
        let e = T::try_parse_from(["t", "--cidr", "bogus"]).unwrap_err();
        let l = super::clap_error_line(&e).unwrap();
        assert!(
            !l.contains('\n') && l.contains("invalid value 'bogus'"),
            "{l}"
        );
        let e = T::try_parse_from(["t"]).unwrap_err();
        let l = super::clap_error_line(&e).unwrap();
        assert!(l.contains("--cidr"), "{l}");
        let e = T::try_parse_from(["t", "--help"]).unwrap_err();
        assert!(super::clap_error_line(&e).is_none());
    }

    #[test]
    fn huge_cells_are_cut_not_a_panic() {
        // A cell wider than 65535 characters made `format!` width padding panic.
        let huge = "x".repeat(70_000);
        let t = super::render_table(&["A", "B"], &[vec![huge, "1".into()]]);
        let first = t.lines().nth(1).unwrap();
        assert!(first.chars().count() < super::MAX_CELL + 10, "{first}");
        assert!(first.contains('…'));
        assert_eq!(super::cap_text("héllo", 3), "hé…");
        assert_eq!(
            super::join_capped((0..5).map(|i| i.to_string()), ",", 2),
            "0,1,… (+3 more)"
        );
    }
}
