//! The documentation holds together: every relative link in README.md, DEVELOPING.md and
//! docs/**/*.md names a file that exists (and, for `file.md#anchor` or `#anchor`, a heading
//! of that file, by GitHub's slug rules), and README.md stays a short user's guide.
//!
//! Each problem is reported as one line: `file:line: what is wrong`.
use std::{
    collections::HashSet,
    fs,
    path::{Path, PathBuf},
};

/// The README is a user's guide; the rest lives under docs/ and in DEVELOPING.md.
const README_MAX_LINES: usize = 300;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root above xtask")
        .to_path_buf()
}

/// README.md, DEVELOPING.md and every .md file under docs/, sorted.
fn markdown_files(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![root.join("README.md"), root.join("DEVELOPING.md")];
    let mut dirs = vec![root.join("docs")];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The file's lines outside fenced code blocks, with inline code spans blanked out, each with
/// its 1-based line number.
fn prose_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut fence: Option<&str> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let marker = if trimmed.starts_with("```") {
            Some("```")
        } else if trimmed.starts_with("~~~") {
            Some("~~~")
        } else {
            None
        };
        match (fence, marker) {
            (None, Some(m)) => fence = Some(m),
            (Some(f), Some(m)) if f == m => fence = None,
            (None, None) => out.push((i + 1, blank_code_spans(line))),
            _ => {}
        }
    }
    out
}

/// `line` with the contents of every `code span` replaced by spaces.
fn blank_code_spans(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut in_code = false;
    for c in line.chars() {
        if c == '`' {
            in_code = !in_code;
            out.push(c);
        } else if in_code {
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    out
}

/// GitHub's anchor for a heading: lowercase, markup and punctuation other than `-` and `_`
/// dropped, spaces turned into `-`.
fn slug(heading: &str) -> String {
    // A link in a heading contributes its text only.
    let mut text = String::new();
    let mut rest = heading;
    while let Some(open) = rest.find("](") {
        let Some(close) = rest[open..].find(')') else {
            break;
        };
        text.push_str(&rest[..open]);
        rest = &rest[open + close + 1..];
    }
    text.push_str(rest);
    text.trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a markdown file's headings (duplicates get GitHub's `-1`, `-2`, ...).
fn anchors(text: &str) -> HashSet<String> {
    let mut seen = HashSet::new();
    for line in text.lines().scan(None::<&str>, |fence, line| {
        let t = line.trim_start();
        let marker = ["```", "~~~"].into_iter().find(|m| t.starts_with(m));
        Some(match (*fence, marker) {
            (None, Some(m)) => {
                *fence = Some(m);
                None
            }
            (Some(f), Some(m)) if f == m => {
                *fence = None;
                None
            }
            (None, None) => Some(line),
            _ => None,
        })
    }) {
        let Some(line) = line else { continue };
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let base = slug(line[hashes..].trim().trim_end_matches('#'));
        let mut anchor = base.clone();
        let mut n = 0;
        while !seen.insert(anchor.clone()) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
    }
    seen
}

/// The targets of inline links and images (`[text](target)`, `![alt](target "title")`) and of
/// reference definitions (`[name]: target`) in one line of prose.
fn link_targets(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(open) = rest.find("](") {
        let after = &rest[open + 2..];
        let Some(close) = after.find(')') else { break };
        let target = after[..close].split_whitespace().next().unwrap_or("");
        out.push(target.trim_matches(['<', '>']).to_string());
        rest = &after[close + 1..];
    }
    let t = line.trim_start();
    let definition = t.strip_prefix('[').and_then(|d| d.split_once("]: "));
    if let Some(target) = definition.and_then(|(_, d)| d.split_whitespace().next()) {
        out.push(target.to_string());
    }
    out
}

/// Why `target`, linked from `file`, does not resolve; None when it does.
fn broken(root: &Path, file: &Path, target: &str) -> Option<String> {
    if target.is_empty() {
        return Some("an empty link".into());
    }
    if target.contains("://") || target.starts_with("mailto:") {
        return None;
    }
    let (path, anchor) = match target.split_once('#') {
        Some((p, a)) => (p, Some(a)),
        None => (target, None),
    };
    let dest = if path.is_empty() {
        file.to_path_buf()
    } else if let Some(from_root) = path.strip_prefix('/') {
        root.join(from_root)
    } else {
        file.parent().unwrap_or(root).join(path)
    };
    if !dest.exists() {
        return Some(format!("{} does not exist", shown(root, &dest)));
    }
    let anchor = anchor?;
    if dest.extension().is_none_or(|e| e != "md") {
        return None;
    }
    let text = fs::read_to_string(&dest).ok()?;
    if anchors(&text).contains(anchor) {
        None
    } else {
        Some(format!(
            "no heading with anchor #{anchor} in {}",
            shown(root, &dest)
        ))
    }
}

/// `path` relative to the workspace root, `..` folded away.
fn shown(root: &Path, path: &Path) -> String {
    let mut parts: Vec<String> = Vec::new();
    let rel = path.strip_prefix(root).unwrap_or(path);
    for c in rel.components() {
        match c {
            std::path::Component::ParentDir => {
                parts.pop();
            }
            std::path::Component::CurDir => {}
            c => parts.push(c.as_os_str().to_string_lossy().into_owned()),
        }
    }
    parts.join("/")
}

#[test]
fn every_relative_link_resolves() {
    let root = root();
    let mut problems = Vec::new();
    for file in markdown_files(&root) {
        let Ok(text) = fs::read_to_string(&file) else {
            problems.push(format!("{}: cannot be read", shown(&root, &file)));
            continue;
        };
        for (n, line) in prose_lines(&text) {
            for target in link_targets(&line) {
                if let Some(why) = broken(&root, &file, &target) {
                    problems.push(format!(
                        "{}:{n}: broken link ({target}): {why}",
                        shown(&root, &file)
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn readme_stays_a_short_guide() {
    let text = fs::read_to_string(root().join("README.md")).expect("README.md");
    let lines = text.lines().count();
    assert!(
        lines < README_MAX_LINES,
        "README.md has {lines} lines, the limit is under {README_MAX_LINES}: move detail to docs/"
    );
}

#[test]
fn slugs_follow_github() {
    assert_eq!(slug("Using `lb`"), "using-lb");
    assert_eq!(
        slug("Backends behind routers: `ipip` and `gue`"),
        "backends-behind-routers-ipip-and-gue"
    );
    assert_eq!(
        slug("Full NAT: backends on any port"),
        "full-nat-backends-on-any-port"
    );
    assert_eq!(slug("snake_case and -dashes-"), "snake_case-and--dashes-");
    let a = anchors("# A\n## A\n```\n# not a heading\n```\n### B: [link](x.md)\n");
    let want: HashSet<String> = ["a", "a-1", "b-link"].map(String::from).into();
    assert_eq!(a, want);
}
