//! The Kubernetes manifests (`packaging/kubernetes/xdp-lb.yaml`) against a current Kubernetes
//! schema (kubernetes-validate, strict: unknown fields are errors), and against the agent:
//! the ConfigMap's config parses, the capabilities are the agent's, upgrades keep forwarding.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use lb_tests::unique_name;

fn manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/kubernetes/xdp-lb.yaml")
}

fn validate(path: &Path) -> anyhow::Result<(bool, String)> {
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", "1.37.0"])
        .arg(path)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

#[test]
fn manifests_pass_the_kubernetes_schema() -> anyhow::Result<()> {
    let (ok, text) = validate(&manifest())?;
    assert!(ok, "{text}");
    for kind in [
        "namespace/xdp-lb",
        "configmap/xdp-lb-config",
        "daemonset/xdp-lb",
    ] {
        assert!(
            text.contains(&format!("passed for resource {kind}")),
            "{text}"
        );
    }
    // The validator is strict for real: a misspelt field fails.
    let yaml = std::fs::read_to_string(manifest())?;
    let broken = std::env::temp_dir().join(format!("{}.yaml", unique_name("k8s")));
    std::fs::write(
        &broken,
        yaml.replace("hostNetwork: true", "hostNetwrk: true"),
    )?;
    let result = validate(&broken);
    let _ = std::fs::remove_file(&broken);
    let (ok, text) = result?;
    assert!(!ok, "a misspelt field passed: {text}");
    Ok(())
}

#[test]
fn the_daemonset_fits_the_agent() -> anyhow::Result<()> {
    let yaml = std::fs::read_to_string(manifest())?;
    // The ConfigMap's lb.toml (the block under `lb.toml: |`) is a valid config.
    let mut lines = yaml
        .lines()
        .skip_while(|l| !l.trim_end().ends_with("lb.toml: |"));
    lines.next();
    let toml: String = lines
        .take_while(|l| l.starts_with("    ") || l.trim().is_empty())
        .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
        .collect();
    let state = lb_userspace::model::parse_config(&toml).map_err(anyhow::Error::msg)?;
    assert_eq!(state.vips.len(), 1, "{toml}");
    // Exactly the agent's capabilities, everything else dropped.
    let wanted: Vec<String> = lb_userspace::dataplane::CAPABILITIES
        .iter()
        .map(|c| format!("\"{}\"", c.to_string().trim_start_matches("CAP_")))
        .collect();
    assert!(
        yaml.contains(&format!("add: [{}]", wanted.join(", "))),
        "capabilities differ from {wanted:?}"
    );
    assert!(yaml.contains("drop: [\"ALL\"]"));
    // Rolling upgrades keep forwarding: the program stays pinned while the pod is replaced.
    assert!(yaml.contains("- --keep-on-exit"));
    // Least privilege: the image by version, no service-account token, and of the host's
    // bpffs only the agent's own directory.
    let image = format!("image: xdp-lb:{}", env!("CARGO_PKG_VERSION"));
    assert!(yaml.contains(&image), "not {image}");
    assert!(!yaml.contains(":latest"));
    assert!(yaml.contains("automountServiceAccountToken: false"));
    assert!(yaml.contains("path: /sys/fs/bpf/xdp-lb\n"));
    assert!(!yaml.contains("path: /sys/fs/bpf\n"));
    Ok(())
}
