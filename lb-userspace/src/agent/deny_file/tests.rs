use super::*;

fn p(s: &str) -> Prefix {
    s.parse().unwrap()
}

fn dir() -> tempdir::Dir {
    tempdir::Dir::new()
}

/// A private directory for one test, removed on drop.
mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let d = std::env::temp_dir().join(format!("lb-deny-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Dir(d)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn list(entries: &[(&str, u64)]) -> DenyList {
    entries.iter().map(|(s, e)| (p(s), *e)).collect()
}

#[test]
fn diff_and_apply_agree() {
    let old = list(&[
        ("192.0.2.0/24", 0),
        ("2001:db8::/64", 5),
        ("198.51.100.1/32", 0),
    ]);
    let new = list(&[
        ("192.0.2.0/24", 0),
        ("2001:db8::/64", 9),
        ("203.0.113.0/24", 9),
    ]);
    let d = diff(&old, &new);
    assert_eq!(
        d,
        vec![
            DenyChange::Remove {
                prefixes: vec![p("198.51.100.1/32")]
            },
            DenyChange::Add {
                end: 9,
                prefixes: vec![p("203.0.113.0/24"), p("2001:db8::/64")]
            },
        ]
    );
    let mut got = old.clone();
    apply(&mut got, &d);
    assert_eq!(got, new);
    assert!(diff(&new, &new).is_empty());
    // Every line reads back as written.
    let text = encode_changes(&d);
    let back: Vec<_> = text.lines().map(|l| decode_change(l).unwrap()).collect();
    assert_eq!(back, d);
}

#[test]
fn appends_to_the_journal_then_folds_it_into_a_snapshot() {
    let d = dir();
    let files = DenyFiles::beside(&d.0.join("lb0.json"));
    assert_eq!(files.load().unwrap(), None);
    let mut want = DenyList::new();
    // The first save writes a snapshot (there is no journal yet).
    let first = vec![DenyChange::Add {
        end: 0,
        prefixes: vec![p("192.0.2.0/24")],
    }];
    apply(&mut want, &first);
    files
        .save(&first, &|| std::borrow::Cow::Borrowed(&want))
        .unwrap();
    let snap = std::fs::metadata(files.snapshot_path()).unwrap();
    // Later ones append one line each and leave the snapshot alone.
    for i in 0..50u32 {
        let c = vec![DenyChange::Add {
            end: u64::from(i),
            prefixes: vec![p(&format!("10.{i}.0.0/16"))],
        }];
        apply(&mut want, &c);
        files
            .save(&c, &|| std::borrow::Cow::Borrowed(&want))
            .unwrap();
    }
    let c = vec![DenyChange::Remove {
        prefixes: vec![p("10.3.0.0/16")],
    }];
    apply(&mut want, &c);
    files
        .save(&c, &|| std::borrow::Cow::Borrowed(&want))
        .unwrap();
    let after = std::fs::metadata(files.snapshot_path()).unwrap();
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!((snap.ino(), snap.len()), (after.ino(), after.len()));
    let journal = std::fs::read_to_string(files.journal_path()).unwrap();
    assert_eq!(journal.lines().count(), 1 + 51, "{journal}");
    assert_eq!(
        DenyFiles::beside(&d.0.join("lb0.json")).load().unwrap(),
        Some(want.clone())
    );
    // A change larger than the room left folds the journal into a new snapshot.
    let big: Vec<Prefix> = (0..20_000u32)
        .map(|i| p(&format!("100.{}.{}.0/24", i >> 8, i & 255)))
        .collect();
    let c = vec![DenyChange::Add {
        end: 0,
        prefixes: big,
    }];
    apply(&mut want, &c);
    files
        .save(&c, &|| std::borrow::Cow::Borrowed(&want))
        .unwrap();
    let journal = std::fs::read_to_string(files.journal_path()).unwrap();
    assert_eq!(journal, journal_header(2));
    assert_eq!(
        DenyFiles::beside(&d.0.join("lb0.json")).load().unwrap(),
        Some(want)
    );
}

#[test]
fn a_torn_last_record_is_ignored_and_cut_off_by_the_next_append() {
    let d = dir();
    let state = d.0.join("lb0.json");
    let files = DenyFiles::beside(&state);
    let mut want = list(&[("192.0.2.0/24", 0)]);
    files.replace(&want).unwrap();
    let c = vec![DenyChange::Add {
        end: 7,
        prefixes: vec![p("198.51.100.0/24")],
    }];
    apply(&mut want, &c);
    files
        .save(&c, &|| std::borrow::Cow::Borrowed(&want))
        .unwrap();
    // A crash in the middle of the next append.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(files.journal_path())
        .unwrap();
    f.write_all(b"+ 0 203.0.113.0/2").unwrap();
    let again = DenyFiles::beside(&state);
    assert_eq!(again.load().unwrap(), Some(want.clone()));
    let c = vec![DenyChange::Remove {
        prefixes: vec![p("192.0.2.0/24")],
    }];
    apply(&mut want, &c);
    again
        .save(&c, &|| std::borrow::Cow::Borrowed(&want))
        .unwrap();
    assert_eq!(DenyFiles::beside(&state).load().unwrap(), Some(want));
    // A record that does not parse in the middle is corruption: refused, one line.
    let text = std::fs::read_to_string(files.journal_path()).unwrap();
    let bad = text.replacen("+ 7", "+ x", 1);
    std::fs::write(files.journal_path(), bad).unwrap();
    let e = DenyFiles::beside(&state).load().unwrap_err().to_string();
    assert!(
        e.contains("is corrupt") && e.contains("line 2") && !e.contains('\n'),
        "{e}"
    );
}

#[test]
fn a_corrupt_snapshot_is_refused_and_a_stale_journal_ignored() {
    let d = dir();
    let state = d.0.join("lb0.json");
    let files = DenyFiles::beside(&state);
    let want = list(&[("192.0.2.0/24", 0), ("2001:db8::/64", 99)]);
    files.replace(&want).unwrap();
    let good = std::fs::read_to_string(files.snapshot_path()).unwrap();
    for bad in [
        good.replace("192.0.2.0/24", "192.0.3.0/24"),
        good[..good.len() - 5].to_string(),
        good.replace("count 2", "count 3"),
        "garbage\n".to_string(),
    ] {
        std::fs::write(files.snapshot_path(), &bad).unwrap();
        let e = DenyFiles::beside(&state).load().unwrap_err().to_string();
        assert!(
            e.contains("is corrupt") && e.contains("fix or remove it"),
            "{e}"
        );
    }
    // A crash between a new snapshot and its journal: the old journal is not replayed.
    std::fs::write(files.snapshot_path(), encode_snapshot(&want, 5)).unwrap();
    std::fs::write(
        files.journal_path(),
        format!("{}- 192.0.2.0/24\n", journal_header(4)),
    )
    .unwrap();
    assert_eq!(DenyFiles::beside(&state).load().unwrap(), Some(want));
    // A journal without its snapshot is refused.
    std::fs::remove_file(files.snapshot_path()).unwrap();
    let e = DenyFiles::beside(&state).load().unwrap_err().to_string();
    assert!(e.contains("is missing"), "{e}");
}
