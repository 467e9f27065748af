//! The CLI's comforts: `--version` names the commit and the map ABI, completion scripts that
//! the shells accept, and man pages.
use std::process::Command;

use lb_tests::{lb_binary, unique_name};

fn lb(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(lb_binary()?).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "`lb {}`: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

#[test]
fn version_names_the_commit_and_the_abi() -> anyhow::Result<()> {
    let v = lb(&["--version"])?;
    let want = format!("map ABI {})", lb_common::ABI_VERSION);
    assert!(
        v.starts_with("lb 0.") && v.contains("(commit ") && v.contains(&want),
        "{v}"
    );
    Ok(())
}

#[test]
fn completions_are_accepted_by_bash() -> anyhow::Result<()> {
    let script = lb(&["completions", "bash"])?;
    // Source it and ask it what follows `lb backend `: the subcommands.
    let probe = format!(
        "{script}\nCOMP_WORDS=(lb backend ''); COMP_CWORD=2; _lb lb '' backend; echo \"${{COMPREPLY[@]}}\""
    );
    let out = Command::new("bash").args(["-c", &probe]).output()?;
    let words = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for sub in ["add", "remove", "drain", "weight", "list"] {
        assert!(words.split_whitespace().any(|w| w == sub), "{words}");
    }
    for shell in ["zsh", "fish"] {
        assert!(lb(&["completions", shell])?.contains("backend"), "{shell}");
    }
    let out = Command::new(lb_binary()?)
        .args(["completions", "tcsh"])
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    Ok(())
}

#[test]
fn man_pages_are_written() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(unique_name("man"));
    let result = (|| -> anyhow::Result<()> {
        lb(&["man", "--out", &dir.to_string_lossy()])?;
        for page in ["lb.1", "lb-run.1", "lb-vip-add.1", "lb-detach.1"] {
            let text = std::fs::read_to_string(dir.join(page))?;
            assert!(text.contains(".TH"), "{page}");
        }
        let run = std::fs::read_to_string(dir.join("lb-run.1"))?;
        assert!(
            run.contains("keep\\-on\\-exit"),
            "lb-run.1 lacks its options"
        );
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
