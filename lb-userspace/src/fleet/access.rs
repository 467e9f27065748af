//! How a node reaches etcd: the endpoints and their scheme, TLS (the CA that signed etcd's
//! certificate, optionally this node's client certificate) and etcd's user/password
//! authentication; and what a failed request means, as one line naming the cause.
//!
//! Every file is read and checked when `lb run` starts, so a wrong path or a PEM without a
//! certificate is refused before anything is attached; a renewed certificate or password is
//! taken by restarting the node.
use std::{
    fmt,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};

use crate::ErrorKind;

/// The store options of `lb run`, as given.
#[derive(Clone, Debug, Default)]
pub struct AccessArgs {
    /// `--store-ca`: PEM, the CA(s) etcd's server certificate must be signed by.
    pub ca: Option<PathBuf>,
    /// `--store-cert` and `--store-key`: this node's client certificate and its key.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// `--store-user` and `--store-password-file`.
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
}

/// A secret read from a file: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("(secret)")
    }
}

/// TLS to etcd: the trusted CA and, when etcd checks clients, this node's identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    ca_file: PathBuf,
    ca: String,
    /// Certificate chain and private key (PEM).
    identity: Option<(String, Secret)>,
}

/// Everything a connection to etcd needs besides the endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    pub tls: Option<Tls>,
    pub user: Option<(String, Secret)>,
}

/// Splits `--store` into its scheme (TLS or not) and `HOST:PORT` endpoints. `etcd://` and
/// `http://` are the plain forms, `https://` TLS; the scheme may be repeated per endpoint
/// (`https://a:2379,https://b:2379`, as etcdctl takes them) but not mixed.
pub fn parse_store_url(store: &str) -> Result<(bool, Vec<String>), String> {
    const FORMS: &str =
        "expected etcd://HOST:PORT[,HOST:PORT...] (or http://), or https://HOST:PORT[,...] for TLS";
    let scheme_of = |s: &str| {
        ["etcd://", "http://", "https://"]
            .into_iter()
            .find(|p| s.starts_with(p))
    };
    let scheme = scheme_of(store).ok_or_else(|| format!("--store `{store}`: {FORMS}"))?;
    let tls = scheme == "https://";
    let mut endpoints = Vec::new();
    for e in store[scheme.len()..].split(',') {
        let e = match scheme_of(e) {
            Some(s) if (s == "https://") == tls => &e[s.len()..],
            Some(_) => {
                return Err(format!(
                    "--store `{store}`: every endpoint uses TLS or none does (https:// mixed with a plain scheme)"
                ));
            }
            None => e,
        };
        let ok = e
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !ok {
            return Err(format!(
                "--store `{store}`: `{e}` is not HOST:PORT (e.g. etcd://127.0.0.1:2379)"
            ));
        }
        endpoints.push(e.to_string());
    }
    Ok((tls, endpoints))
}

/// A file holding a secret must be closed to group and others, as ssh insists for its keys:
/// one that others can read is no longer a secret, and one they can write lets them choose
/// who this node is. Its owner and root can still read it (a systemd credential or a
/// Kubernetes secret with `defaultMode: 0400` passes).
fn read_private(option: &str, path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{option} {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{option} {}: open to group or others (mode {mode:04o}): `chmod 600` it, a secret others can read is not one",
            path.display()
        ));
    }
    read(option, path)
}

fn read(option: &str, path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{option} {}: {e}", path.display()))
}

fn pem_certificates(option: &str, path: &Path, pem: &str) -> Result<(), String> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    if certs.is_empty() || certs.iter().any(Result::is_err) {
        return Err(format!(
            "{option} {}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(())
}

impl Access {
    /// Reads and checks the files `args` names, for a store that uses TLS or not.
    pub fn load(args: &AccessArgs, tls: bool) -> Result<Self, String> {
        let tls = match (tls, &args.ca) {
            (false, None) => {
                if args.cert.is_some() || args.key.is_some() {
                    return Err("--store-cert and --store-key need an https:// --store".into());
                }
                None
            }
            (false, Some(_)) => return Err("--store-ca needs an https:// --store".into()),
            (true, None) => {
                return Err(
                    "--store https://: give --store-ca FILE, the CA that signed etcd's certificate (the system's public roots are not trusted for the store)"
                        .into(),
                );
            }
            (true, Some(ca_file)) => {
                let ca = read("--store-ca", ca_file)?;
                pem_certificates("--store-ca", ca_file, &ca)?;
                let identity = match (&args.cert, &args.key) {
                    (None, None) => None,
                    (Some(c), Some(k)) => {
                        let cert = read("--store-cert", c)?;
                        pem_certificates("--store-cert", c, &cert)?;
                        let key = read_private("--store-key", k)?;
                        PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|_| {
                            format!("--store-key {}: no PEM private key in it", k.display())
                        })?;
                        Some((cert, Secret(key)))
                    }
                    _ => return Err("--store-cert and --store-key go together".into()),
                };
                Some(Tls {
                    ca_file: ca_file.clone(),
                    ca,
                    identity,
                })
            }
        };
        let user = match (&args.user, &args.password_file) {
            (None, None) => None,
            (Some(user), Some(file)) => {
                if user.is_empty() || user.chars().any(char::is_control) {
                    return Err(format!(
                        "--store-user `{}`: not a user name",
                        user.escape_default()
                    ));
                }
                let text = read_private("--store-password-file", file)?;
                let password = text
                    .strip_suffix('\n')
                    .map(|t| t.strip_suffix('\r').unwrap_or(t))
                    .unwrap_or(&text);
                if password.is_empty() || password.contains('\n') {
                    return Err(format!(
                        "--store-password-file {}: expected the password alone on one line",
                        file.display()
                    ));
                }
                if tls.is_none() {
                    log::warn!(
                        "--store-user over a plain etcd:// connection: the password crosses the network unencrypted (use https://)"
                    );
                }
                Some((user.clone(), Secret(password.to_string())))
            }
            _ => return Err("--store-user and --store-password-file go together".into()),
        };
        Ok(Access { tls, user })
    }

    /// The scheme endpoints are shown with.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "etcd" }
    }

    /// `opts` with TLS and credentials added.
    pub fn apply(&self, mut opts: ConnectOptions) -> ConnectOptions {
        if let Some(tls) = &self.tls {
            let mut t = TlsOptions::new()
                .ca_certificate(Certificate::from_pem(&tls.ca))
                // etcd negotiates h2 by ALPN; without it, gRPC is still HTTP/2.
                .assume_http2(true);
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(Identity::from_pem(cert, &key.0));
            }
            opts = opts.with_tls(t);
        }
        if let Some((user, password)) = &self.user {
            opts = opts.with_user(user.clone(), password.0.clone());
        }
        opts
    }

    /// Who this node is to etcd, for messages.
    fn who(&self) -> String {
        match (
            &self.user,
            self.tls.as_ref().and_then(|t| t.identity.as_ref()),
        ) {
            (Some((u, _)), _) => format!("user `{u}`"),
            (None, Some(_)) => "this node's client certificate".into(),
            (None, None) => "an anonymous client".into(),
        }
    }
}

/// Why a request to etcd failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Cause {
    #[error("etcd's certificate is not trusted with --store-ca {ca} ({detail})")]
    ServerNotTrusted { ca: String, detail: String },
    // The TLS alert or a bare hang-up, whichever wins the race: left out of the line.
    #[error(
        "etcd refused this node's client certificate: give --store-cert and --store-key signed by a CA etcd trusts"
    )]
    ClientCertRejected { detail: String },
    #[error("etcd asks for a client certificate: give --store-cert and --store-key")]
    ClientCertRequired { detail: String },
    #[error("etcd does not speak TLS there ({detail}): use etcd:// for a plain etcd")]
    NotTls { detail: String },
    #[error(
        "etcd speaks TLS there: use https:// with --store-ca (and a client certificate if etcd asks for one)"
    )]
    TlsRequired { detail: String },
    #[error(
        "authentication failed for user `{user}`: wrong user name or password (--store-user, --store-password-file)"
    )]
    BadCredentials { user: String },
    #[error(
        "permission denied to {who} on {prefix}: grant its role readwrite on that prefix (etcdctl role grant-permission ROLE --prefix=true readwrite {prefix})"
    )]
    PermissionDenied { who: String, prefix: String },
    #[error(
        "authentication is enabled in etcd: give --store-user and --store-password-file ({detail})"
    )]
    AuthRequired { detail: String },
    #[error(
        "authentication is not enabled in etcd, but --store-user was given: enable it (etcdctl auth enable) or drop --store-user"
    )]
    AuthDisabled,
    #[error("a value under {prefix} is larger than this node reads ({detail}): delete it")]
    TooLarge { prefix: String, detail: String },
    #[error("{0}")]
    Unreachable(String),
}

impl Cause {
    /// Whether retrying cannot help: the options or etcd's setup are wrong, not the network.
    pub fn is_setup(&self) -> bool {
        !matches!(self, Cause::Unreachable(_) | Cause::TooLarge { .. })
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Cause::Unreachable(_) | Cause::TooLarge { .. } => ErrorKind::Unavailable,
            Cause::ClientCertRejected { .. }
            | Cause::ClientCertRequired { .. }
            | Cause::BadCredentials { .. }
            | Cause::PermissionDenied { .. }
            | Cause::AuthRequired { .. } => ErrorKind::Permission,
            Cause::ServerNotTrusted { .. }
            | Cause::NotTls { .. }
            | Cause::TlsRequired { .. }
            | Cause::AuthDisabled => ErrorKind::Invalid,
        }
    }
}

/// A failed etcd request: where, doing what, and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("etcd {at}: {what}: {cause}")]
pub struct StoreError {
    /// The endpoints with their scheme.
    pub at: String,
    pub what: &'static str,
    pub cause: Cause,
}

/// The text of an etcd error and every cause below it, one string (tonic's status message
/// holds only the outermost part; the TLS alert or certificate error is in its sources).
fn chain_text(e: &etcd_client::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut push = |s: String| {
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    };
    let mut next: Option<&dyn std::error::Error> = match e {
        etcd_client::Error::GRpcStatus(s) => {
            push(s.message().to_string());
            std::error::Error::source(s)
        }
        etcd_client::Error::TransportError(t) => {
            push(t.to_string());
            std::error::Error::source(t)
        }
        other => {
            push(other.to_string());
            None
        }
    };
    while let Some(err) = next {
        push(err.to_string());
        next = err.source();
    }
    parts.retain(|p| !p.is_empty());
    parts.join(": ")
}

/// The part of `text` from `keyword` on (e.g. "invalid peer certificate: UnknownIssuer").
fn from(text: &str, keyword: &str) -> String {
    let low = text.to_ascii_lowercase();
    let tail = low.find(keyword).map_or(text, |i| &text[i..]);
    // The keyword's part and the one after it, not the wrappers that follow.
    tail.splitn(3, ": ").take(2).collect::<Vec<_>>().join(": ")
}

/// A connection closed under a first request: etcd hung up at once. Taken as a cause only
/// for the first contact (see [`first_contact`]); later, the same words mean an etcd that
/// went away.
fn closed(text: &str) -> bool {
    let low = text.to_ascii_lowercase();
    [
        "broken pipe",
        "connection reset",
        "stream closed",
        "connection closed",
    ]
    .iter()
    .any(|k| low.contains(k))
}

/// What a first request's failure means when etcd hung up without a word: a TLS etcd that
/// refuses this node's certificate (TLS 1.3 sends the refusal after the handshake, racing the
/// request), or a TLS etcd spoken to in plain text (it closes on the first bytes). Anything
/// else stays as it was.
pub fn first_contact(cause: Cause, access: &Access) -> Cause {
    let Cause::Unreachable(text) = &cause else {
        return cause;
    };
    if !closed(text) {
        return cause;
    }
    let detail = "etcd closed the connection at once".to_string();
    match access.tls.as_ref().map(|t| t.identity.is_some()) {
        Some(true) => Cause::ClientCertRejected { detail },
        Some(false) => Cause::ClientCertRequired { detail },
        None => Cause::TlsRequired { detail },
    }
}

/// What `e` means for a node with `access` reading `prefix`.
pub fn classify(e: &etcd_client::Error, access: &Access, prefix: &str) -> Cause {
    let text = chain_text(e);
    let low = text.to_ascii_lowercase();
    let tls = access.tls.as_ref();
    if low.contains("invalid user id or password") {
        return Cause::BadCredentials {
            user: access
                .user
                .as_ref()
                .map(|(u, _)| u.clone())
                .unwrap_or_default(),
        };
    }
    if low.contains("permission denied") {
        return Cause::PermissionDenied {
            who: access.who(),
            prefix: prefix.to_string(),
        };
    }
    if low.contains("authentication is not enabled") {
        return Cause::AuthDisabled;
    }
    if low.contains("user name is empty") || low.contains("invalid auth token") {
        return Cause::AuthRequired {
            detail: from(&text, "etcdserver"),
        };
    }
    if low.contains("decoded message length too large") {
        return Cause::TooLarge {
            prefix: prefix.to_string(),
            detail: from(&text, "decoded message length"),
        };
    }
    if let Some(t) = tls {
        if low.contains("invalid peer certificate") {
            return Cause::ServerNotTrusted {
                ca: t.ca_file.display().to_string(),
                detail: from(&text, "invalid peer certificate"),
            };
        }
        if low.contains("received fatal alert") {
            let detail = from(&text, "received fatal alert");
            return if t.identity.is_some() {
                Cause::ClientCertRejected { detail }
            } else {
                Cause::ClientCertRequired { detail }
            };
        }
        if low.contains("invalidcontenttype") || low.contains("corrupt message") {
            return Cause::NotTls {
                detail: from(&text, "received corrupt message"),
            };
        }
    }
    Cause::Unreachable(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_take_a_scheme_each_or_once() {
        assert_eq!(
            parse_store_url("https://a:2379,https://b:2379").unwrap(),
            (true, vec!["a:2379".to_string(), "b:2379".to_string()])
        );
        assert_eq!(
            parse_store_url("http://a:2379,b:2379").unwrap(),
            (false, vec!["a:2379".to_string(), "b:2379".to_string()])
        );
        assert!(
            parse_store_url("https://a:2379,etcd://b:2379")
                .unwrap_err()
                .contains("TLS or none")
        );
        assert!(
            parse_store_url("grpc://a:1")
                .unwrap_err()
                .contains("expected etcd://")
        );
    }

    fn file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn options_are_checked_before_anything_connects() {
        let dir = std::env::temp_dir().join(format!("lb-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let open = file(&dir, "open", "secret\n", 0o644);
        let shut = file(&dir, "shut", "secret\n", 0o600);
        let two = file(&dir, "two", "a\nb\n", 0o600);
        let not_pem = file(&dir, "ca", "hello", 0o644);
        let args = |f: &Path| AccessArgs {
            user: Some("lb".into()),
            password_file: Some(f.to_path_buf()),
            ..AccessArgs::default()
        };
        let a = Access::load(&args(&shut), false).unwrap();
        assert_eq!(a.user, Some(("lb".to_string(), Secret("secret".into()))));
        assert!(!format!("{a:?}").contains("secret\""), "{a:?}");
        let e = Access::load(&args(&open), false).unwrap_err();
        assert!(e.contains("open to group or others (mode 0644)"), "{e}");
        let e = Access::load(&args(&two), false).unwrap_err();
        assert!(e.contains("alone on one line"), "{e}");
        let ca = AccessArgs {
            ca: Some(not_pem.clone()),
            ..AccessArgs::default()
        };
        assert!(
            Access::load(&ca, false)
                .unwrap_err()
                .contains("needs an https://")
        );
        assert!(
            Access::load(&ca, true)
                .unwrap_err()
                .contains("no PEM certificate")
        );
        assert!(
            Access::load(&AccessArgs::default(), true)
                .unwrap_err()
                .contains("give --store-ca FILE")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
