//! A real etcd for fleet tests, inside a namespace the test created, with its own data dir
//! (removed on drop). It can be stopped (SIGKILL) and started again on the same data. With
//! [`Security::Tls`] it serves TLS from a throw-away CA made with the openssl CLI, and may
//! require client certificates.
use std::{
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{ChildGuard, Netns, unique_name};

/// The client port (the namespace is the test's own, so a fixed port cannot clash).
pub const PORT: u16 = 2379;

/// How clients reach the etcd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    Plain,
    /// TLS with a server certificate for every address given; `client_certs`: etcd also
    /// requires a client certificate signed by its CA (`--client-cert-auth`).
    Tls {
        client_certs: bool,
    },
}

/// Runs `openssl ARGS` (in `dir`), failing with its stderr.
fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!(
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A CA `name` (`name.pem`, `name-key.pem`).
fn make_ca(dir: &Path, name: &str) -> anyhow::Result<()> {
    let (cert, key, subj) = (
        format!("{name}.pem"),
        format!("{name}-key.pem"),
        format!("/CN={name}"),
    );
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &cert,
            "-days",
            "2",
            "-subj",
            &subj,
        ],
    )
}

/// A certificate `name` signed by CA `ca`, with `san` (e.g. `IP:10.0.0.1`) and `usage`
/// (`serverAuth` or `clientAuth`); its key is mode 600, as `lb run` insists.
fn make_cert(dir: &Path, name: &str, ca: &str, san: &str, usage: &str) -> anyhow::Result<()> {
    let (cert, key, csr, ext) = (
        format!("{name}.pem"),
        format!("{name}-key.pem"),
        format!("{name}.csr"),
        format!("{name}.ext"),
    );
    let subj = format!("/CN={name}");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &subj,
        ],
    )?;
    std::fs::write(
        dir.join(&ext),
        format!("subjectAltName={san}\nextendedKeyUsage={usage}\n"),
    )?;
    let (ca_cert, ca_key) = (format!("{ca}.pem"), format!("{ca}-key.pem"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_cert,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
    )?;
    std::fs::set_permissions(dir.join(&key), std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

pub struct Etcd {
    ns: String,
    dir: PathBuf,
    /// Address the nodes reach it on (one of the namespace's addresses).
    pub addr: String,
    security: Security,
    /// `etcdctl --user` once authentication is enabled (the root user).
    pub ctl_user: Option<String>,
    child: Option<ChildGuard>,
}

impl Etcd {
    /// Starts etcd in `ns`, listening on every address of it; `addr` is the one waited on.
    pub fn start(ns: &Netns, addr: &str) -> anyhow::Result<Self> {
        Self::start_with(ns, addr, &[addr], Security::Plain)
    }

    /// As [`Etcd::start`], with `security`; a TLS server certificate names every address of
    /// `addrs`. The certificates (`ca`, `server`, `client` signed by `ca`; `other-ca` and
    /// `other-client` signed by it) are in [`Etcd::cert`].
    pub fn start_with(
        ns: &Netns,
        addr: &str,
        addrs: &[&str],
        security: Security,
    ) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(unique_name("etcd"));
        std::fs::create_dir_all(&dir)?;
        let mut e = Etcd {
            ns: ns.name().to_string(),
            dir,
            addr: addr.to_string(),
            security,
            ctl_user: None,
            child: None,
        };
        if security != Security::Plain {
            let certs = e.dir.join("certs");
            std::fs::create_dir_all(&certs)?;
            make_ca(&certs, "ca")?;
            make_ca(&certs, "other-ca")?;
            let san: Vec<String> = addrs.iter().map(|a| format!("IP:{a}")).collect();
            make_cert(&certs, "server", "ca", &san.join(","), "serverAuth")?;
            make_cert(&certs, "client", "ca", "DNS:client", "clientAuth")?;
            make_cert(
                &certs,
                "other-client",
                "other-ca",
                "DNS:other",
                "clientAuth",
            )?;
        }
        e.resume()?;
        Ok(e)
    }

    /// Certificate or key file `name` (e.g. `ca.pem`, `client-key.pem`) of a TLS etcd.
    pub fn cert(&self, name: &str) -> String {
        self.dir.join("certs").join(name).display().to_string()
    }

    /// A file in this etcd's directory (removed with it) holding `text`, mode `mode`.
    pub fn file(&self, name: &str, text: &str, mode: u32) -> anyhow::Result<String> {
        let p = self.dir.join(name);
        std::fs::write(&p, text)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        Ok(p.display().to_string())
    }

    fn scheme(&self) -> &'static str {
        match self.security {
            Security::Plain => "http",
            Security::Tls { .. } => "https",
        }
    }

    /// `etcd://ADDR:PORT` (or `https://...`) for `lb run --store`.
    pub fn url(&self) -> String {
        self.url_at(&self.addr)
    }

    /// As [`Etcd::url`], reached on `addr`.
    pub fn url_at(&self, addr: &str) -> String {
        match self.security {
            Security::Plain => format!("etcd://{addr}:{PORT}"),
            Security::Tls { .. } => format!("https://{addr}:{PORT}"),
        }
    }

    /// The `lb run` options a node needs besides `--store`: the CA, and the client
    /// certificate when etcd asks for one.
    pub fn client_args(&self) -> Vec<String> {
        match self.security {
            Security::Plain => Vec::new(),
            Security::Tls { client_certs } => {
                let mut v = vec!["--store-ca".to_string(), self.cert("ca.pem")];
                if client_certs {
                    v.extend([
                        "--store-cert".to_string(),
                        self.cert("client.pem"),
                        "--store-key".to_string(),
                        self.cert("client-key.pem"),
                    ]);
                }
                v
            }
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, program]);
        cmd
    }

    /// Starts (again) on the same data dir and waits until it answers.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))?;
        let mut cmd = self.command("etcd");
        let scheme = self.scheme();
        cmd.args(["--name", "t", "--data-dir"])
            .arg(self.dir.join("data"))
            .args([
                "--listen-client-urls",
                &format!("{scheme}://0.0.0.0:{PORT}"),
                "--advertise-client-urls",
                &format!("{scheme}://{}:{PORT}", self.addr),
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "t=http://127.0.0.1:2380",
            ])
            .stderr(Stdio::from(log));
        if let Security::Tls { client_certs } = self.security {
            cmd.args(["--cert-file", &self.cert("server.pem")])
                .args(["--key-file", &self.cert("server-key.pem")]);
            if client_certs {
                cmd.args([
                    "--trusted-ca-file",
                    &self.cert("ca.pem"),
                    "--client-cert-auth",
                ]);
            }
        }
        self.child = Some(ChildGuard::spawn(cmd, "etcd")?);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.ctl(&["endpoint", "health"]).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "etcd did not become healthy within 20 s; its log: {}",
            std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
        )
    }

    /// What etcd logged (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    /// SIGKILL (the store disappears at once, as a crashed or partitioned etcd does).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    /// `etcdctl ARGS` against it; stdout.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.ctl_with(args, None)
    }

    /// `etcdctl ARGS` with `input` on its stdin (`put KEY` reads the value there: a value
    /// of megabytes does not fit in one argument).
    pub fn ctl_with(&self, args: &[&str], input: Option<&[u8]>) -> anyhow::Result<String> {
        let mut cmd = self.command("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &format!("{}://{}:{PORT}", self.scheme(), self.addr),
                "--dial-timeout",
                "1s",
                "--command-timeout",
                "5s",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if self.security != Security::Plain {
            cmd.args(["--cacert", &self.cert("ca.pem")])
                .args(["--cert", &self.cert("client.pem")])
                .args(["--key", &self.cert("client-key.pem")]);
        }
        if let Some(u) = &self.ctl_user {
            cmd.args(["--user", u]);
        }
        let mut child = cmd.args(args).spawn().context("running etcdctl")?;
        let mut stdin = child.stdin.take().context("etcdctl stdin")?;
        if let Some(input) = input {
            stdin.write_all(input)?;
        }
        drop(stdin);
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "etcdctl {:?}: {}",
                args.iter()
                    .map(|a| a.chars().take(80).collect::<String>())
                    .collect::<Vec<_>>(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
