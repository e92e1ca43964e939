//! What a cloud VM runs on first boot (cloud-init user-data on EC2, the
//! `user_customize` script on Seeweb): install `nembo-agent` as an enabled
//! systemd unit with the coordinators' endpoints, the cluster CA and a token
//! that admits that one node. Enabled, so it comes back after the reboot
//! some providers do after first boot, and after any later one.
//!
//! Every path is under `$NEMBO_ROOT` (empty on a real VM), so a test can run
//! the very script a VM gets inside a scratch directory.

use serde::Deserialize;

use super::LaunchRequest;
use nembo_domain::task::fmt_num;

/// Settings from `bootstrap:` in providers.yaml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapSettings {
    /// Coordinator URLs as a VM reaches them (default: the members' URLs,
    /// which are only right when those are public addresses).
    #[serde(default)]
    pub coordinators: Vec<String>,
    /// Where a VM downloads `nembo-agent` (https://, or file:// for an image
    /// that has it). Default: the release matching this coordinator.
    pub agent_url: Option<String>,
    /// SHA-256 the download must have (hex); recommended with http(s) URLs.
    pub agent_sha256: Option<String>,
}

/// Everything a node's first-boot script needs but the node id.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    /// Coordinator URLs.
    pub coordinators: Vec<String>,
    /// Cluster CA, PEM.
    pub ca_pem: String,
    /// The cluster's agent token, from which node tokens are derived. Never
    /// written into a script itself.
    pub agent_token: std::sync::Arc<str>,
    /// Where the agent binary comes from.
    pub agent_url: String,
    /// Its checksum, if known.
    pub agent_sha256: Option<String>,
    /// Heartbeat period for the agent.
    pub heartbeat_ms: u32,
}

/// The release URL of the agent for this version.
pub fn default_agent_url() -> String {
    format!(
        "https://github.com/nembo-dev/nembo/releases/download/v{}/nembo-agent-x86_64-unknown-linux-gnu",
        env!("CARGO_PKG_VERSION")
    )
}

/// When the unit starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Now, on first boot (EC2).
    Now,
    /// At the next boot only: the provider reboots the VM after first boot
    /// (Seeweb), and an agent started now would be cut off mid-enrollment.
    AfterReboot,
}

impl Bootstrap {
    /// The bash script for the node of `req`.
    pub fn script(&self, req: &LaunchRequest, start: Start) -> String {
        let token = crate::identity::tls::node_token(&self.agent_token, &req.node_id);
        let checksum = match &self.agent_sha256 {
            Some(sum) => format!(
                "echo \"{} $R/usr/local/bin/nembo-agent.new\" | sha256sum -c - >/dev/null\n",
                shell_word(sum)
            ),
            None => String::new(),
        };
        let start_now = match start {
            Start::Now => "systemctl start nembo-agent.service\n",
            Start::AfterReboot => "",
        };
        format!(
            r#"#!/bin/bash
# Nembo node bootstrap for {node}: installs nembo-agent as a systemd unit.
set -euo pipefail
R="${{NEMBO_ROOT:-}}"
umask 077
mkdir -p "$R/etc/nembo" "$R/var/lib/nembo" "$R/usr/local/bin" "$R/etc/systemd/system"
cat > "$R/etc/nembo/ca.pem" <<'NEMBO_CA'
{ca}NEMBO_CA
printf '%s' {token} > "$R/etc/nembo/join-token"
chmod 600 "$R/etc/nembo/join-token"
curl -fsSL --retry 10 --retry-delay 3 -o "$R/usr/local/bin/nembo-agent.new" {url}
{checksum}chmod 755 "$R/usr/local/bin/nembo-agent.new"
mv "$R/usr/local/bin/nembo-agent.new" "$R/usr/local/bin/nembo-agent"
umask 022
# Tasks with `image_id: docker:<image>` need a container engine (docker
# where the VM image has one, as Deep Learning AMIs do, else podman), and
# storage objects rclone and FUSE. Only on a real VM (a test's scratch root
# installs nothing).
want=""
command -v docker >/dev/null || command -v podman >/dev/null || want="$want podman"
command -v rclone >/dev/null || want="$want rclone"
command -v fusermount3 >/dev/null || want="$want fuse3"
if [ -z "$R" ] && [ -n "$want" ]; then
  if command -v apt-get >/dev/null; then
    {{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $want; }} >/dev/null 2>&1 \
      || echo "nembo: could not install$want; docker: images or bucket mounts may not work here" >&2
  elif command -v dnf >/dev/null; then
    dnf install -y -q $want >/dev/null 2>&1 \
      || echo "nembo: could not install$want; docker: images or bucket mounts may not work here" >&2
  fi
fi
# The address the job's other nodes reach this one at (SKYPILOT_NODE_IPS,
# and where its ports are): the VM's first address, as its cloud gave it.
address="$(hostname -I 2>/dev/null | awk '{{print $1}}')"
address="${{address:-127.0.0.1}}"
# Where the world reaches it, for its ports: EC2's public IPv4 (IMDSv2),
# where there is one; elsewhere the address above serves.
public=""
if [ -z "$R" ] && imds_token="$(curl -fsS -m 2 -X PUT http://169.254.169.254/latest/api/token -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' 2>/dev/null)"; then
  public="$(curl -fsS -m 2 -H "X-aws-ec2-metadata-token: $imds_token" http://169.254.169.254/latest/meta-data/public-ipv4 2>/dev/null || true)"
fi
cat > "$R/etc/systemd/system/nembo-agent.service" <<NEMBO_UNIT
[Unit]
Description=Nembo agent ({node})
Wants=network-online.target
After=network-online.target

[Service]
ExecStart=$R/usr/local/bin/nembo-agent --coordinator {endpoints} --ca-cert $R/etc/nembo/ca.pem --join-token-file $R/etc/nembo/join-token --node-id {node} --work-dir $R/var/lib/nembo --cpus {cpus} --memory-gb {mem} --heartbeat-ms {hb} --address $address${{public:+ --public-address $public}}
Restart=always
RestartSec=2
KillMode=process

[Install]
WantedBy=multi-user.target
NEMBO_UNIT
systemctl daemon-reload
systemctl enable nembo-agent.service
{start_now}"#,
            node = req.node_id,
            ca = ensure_newline(&self.ca_pem),
            token = shell_word(&token),
            url = shell_word(&self.agent_url),
            endpoints = self.coordinators.join(","),
            cpus = fmt_num(req.resources.cpus),
            mem = fmt_num(req.resources.memory_gb),
            hb = self.heartbeat_ms,
        )
    }
}

fn ensure_newline(s: &str) -> String {
    if s.ends_with('\n') {
        s.to_string()
    } else {
        format!("{s}\n")
    }
}

/// Single-quotes a word for bash.
fn shell_word(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nembo_domain::state::Resources;
    use std::os::unix::fs::PermissionsExt;

    fn request() -> LaunchRequest {
        LaunchRequest {
            node_id: "node-42".into(),
            region: "it-fr2".into(),
            zone: None,
            instance_type: "ECS1GPU10".into(),
            resources: Resources {
                cpus: 16.0,
                memory_gb: 120.0,
                ..Resources::default()
            },
            spot: false,
            disk_gb: None,
            disk_tier: None,
            image_id: None,
            ports: Vec::new(),
            term: 3,
        }
    }

    /// Runs the script as a VM would, with `systemctl` recorded rather than
    /// obeyed, and checks what is left on "disk".
    #[test]
    fn the_script_installs_an_enabled_unit_with_a_private_node_token() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent-binary");
        std::fs::write(&agent, "#!/bin/sh\necho agent\n").unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let calls = dir.path().join("systemctl.calls");
        let stub = bin.join("systemctl");
        std::fs::write(
            &stub,
            format!("#!/bin/sh\necho \"$@\" >> {}\n", calls.display()),
        )
        .unwrap();
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
        let b = Bootstrap {
            coordinators: vec![
                "https://10.0.0.1:7443".into(),
                "https://10.0.0.2:7443".into(),
            ],
            ca_pem: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----".into(),
            agent_token: "cluster-secret".into(),
            agent_url: format!("file://{}", agent.display()),
            agent_sha256: None,
            heartbeat_ms: 1000,
        };
        let root = dir.path().join("root");
        for (start, enabled_only) in [(Start::AfterReboot, true), (Start::Now, false)] {
            let _ = std::fs::remove_file(&calls);
            let script = b.script(&request(), start);
            assert!(
                !script.contains("cluster-secret"),
                "the cluster token leaked"
            );
            let out = std::process::Command::new("bash")
                .arg("-c")
                .arg(&script)
                .env("NEMBO_ROOT", &root)
                .env(
                    "PATH",
                    format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
                )
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let calls = std::fs::read_to_string(&calls).unwrap();
            assert!(calls.contains("enable nembo-agent.service"), "{calls}");
            assert_eq!(
                !calls.contains("start nembo-agent"),
                enabled_only,
                "{calls}"
            );
        }
        let token_file = root.join("etc/nembo/join-token");
        let token = std::fs::read_to_string(&token_file).unwrap();
        assert_eq!(
            crate::identity::tls::node_token_owner("cluster-secret", &token),
            Some("node-42")
        );
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "token file mode {mode:o}");
        let unit =
            std::fs::read_to_string(root.join("etc/systemd/system/nembo-agent.service")).unwrap();
        assert!(unit.contains("WantedBy=multi-user.target") && unit.contains("Restart=always"));
        assert!(
            unit.contains("--coordinator https://10.0.0.1:7443,https://10.0.0.2:7443 --ca-cert")
        );
        assert!(unit.contains("--node-id node-42") && unit.contains("--cpus 16 --memory-gb 120"));
        // The VM's own address, not loopback: its peers use it.
        let address = unit
            .split("--address ")
            .nth(1)
            .and_then(|a| a.split_whitespace().next())
            .expect("an --address");
        assert!(address.parse::<std::net::IpAddr>().is_ok(), "{address}");
        let ca = std::fs::read_to_string(root.join("etc/nembo/ca.pem")).unwrap();
        assert!(ca.starts_with("-----BEGIN CERTIFICATE-----\nAAAA\n"));
        let installed = root.join("usr/local/bin/nembo-agent");
        assert_eq!(
            std::fs::read(&installed).unwrap(),
            std::fs::read(&agent).unwrap()
        );
        // A wrong checksum stops the install before anything runs.
        let bad = Bootstrap {
            agent_sha256: Some("00".repeat(32)),
            ..b
        };
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(bad.script(&request(), Start::Now))
            .env("NEMBO_ROOT", dir.path().join("root2"))
            .env(
                "PATH",
                format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
            )
            .output()
            .unwrap();
        assert!(!out.status.success());
    }
}
