//! A backend's health check as configured, its defaults and its rules.
use serde::{Deserialize, Serialize};

use super::VipAddr;

/// How a backend's health is probed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// `tcp` (connect) or `http` (GET `path`, expect `expect_status`).
    pub kind: HealthKind,
    /// Port to probe; defaults to the VIP's port.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default = "default_status")]
    pub expect_status: u16,
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Consecutive successes that bring a down backend back.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that take an up backend out.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    Tcp,
    Http,
}

fn default_path() -> String {
    "/health".into()
}
fn default_status() -> u16 {
    200
}
fn default_interval() -> u64 {
    1000
}
fn default_timeout() -> u64 {
    500
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

impl HealthCheck {
    pub fn validate(&self, vip: &VipAddr) -> Result<(), String> {
        if self.port.unwrap_or(vip.port) == 0 {
            return Err(format!(
                "VIP {vip} covers every port: give its health check a `port`"
            ));
        }
        if self.interval_ms < 50 || self.timeout_ms == 0 || self.timeout_ms > self.interval_ms {
            return Err(format!(
                "VIP {vip}: health check needs interval_ms >= 50 and 0 < timeout_ms <= interval_ms"
            ));
        }
        if self.rise == 0 || self.fall == 0 {
            return Err(format!(
                "VIP {vip}: health check rise and fall must be at least 1"
            ));
        }
        if !self.path.starts_with('/') {
            return Err(format!("VIP {vip}: health check path must start with /"));
        }
        if self.path.len() > MAX_PATH || self.path.chars().any(|c| c.is_control() || c == ' ') {
            return Err(format!(
                "VIP {vip}: health check path must be at most {} characters, without spaces or control characters",
                MAX_PATH
            ));
        }
        Ok(())
    }
}

/// Longest health-check path sent (longer ones are refused by validation).
pub const MAX_PATH: usize = 1024;
