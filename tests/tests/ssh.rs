//! `nembo ssh`: a real pseudo-terminal on each node of a cluster, through
//! the coordinator and the agent's own session (Python's `pty` plays the
//! person at the keyboard), commands with their exit codes, `--proxy` as
//! ssh's ProxyCommand against a real sshd, refusals, and a session keeping
//! an idle cluster from autostopping.

use std::process::{Command, Stdio};
use std::time::Duration;

use nembo_proto::v1 as pb;
use nembo_tests::{bin, wait_for, Coordinator, LoopbackSshd};
use serde_json::Value;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `nembo ssh` with the CLI's environment for `c`.
fn nembo(c: &Coordinator) -> Command {
    let mut cmd = Command::new(bin("nembo"));
    cmd.env("NEMBO_API_INFO", c.dir.path().join("api.json"))
        .env("NEMBO_HOME", c.dir.path().join("cli-home"));
    cmd
}

fn cluster(c: &Coordinator, name: &str) -> Value {
    let out = c.cli(&["status", name, "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["clusters"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_on_each_node_resizes_interrupts_and_exits_with_the_shells_code() {
    let c = Coordinator::start(&[]).await;
    let out = c.cli(&["launch", "-c", "dev", "--num-nodes", "2", "echo up"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/pty_session.py");
    for rank in ["0", "1"] {
        let out = Command::new("python3")
            .arg(script)
            .arg(bin("nembo"))
            .arg("dev")
            .arg(rank)
            .env("NEMBO_API_INFO", c.dir.path().join("api.json"))
            .env("NEMBO_HOME", c.dir.path().join("cli-home"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)));
        for step in ["rank", "resized", "ctrl_c"] {
            assert_eq!(v[step], true, "rank {rank}, {step}: {}", v["transcript"]);
        }
        assert_eq!(v["exit_code"], 7, "{}", v["transcript"]);
    }

    // A command: pipes, stderr apart, its exit code, stdin passed through.
    let mut child = nembo(&c)
        .args(["ssh", "dev", "--node", "1", "--"])
        .arg("read x; echo got=$x rank=$SKYPILOT_NODE_RANK; echo oops >&2; exit 3")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "got=hello rank=1\n");
    assert!(text(&out.stderr).contains("oops"), "{}", text(&out.stderr));

    // No such node, no such cluster: clear refusals.
    let out = nembo(&c)
        .args(["ssh", "dev", "--node", "5", "--", "true"])
        .output()
        .unwrap();
    assert!(
        text(&out.stderr).contains("has 2 node(s)"),
        "{}",
        text(&out.stderr)
    );
    let out = nembo(&c)
        .args(["ssh", "nope", "--", "true"])
        .output()
        .unwrap();
    assert!(
        text(&out.stderr).contains("cluster nope not found"),
        "{}",
        text(&out.stderr)
    );

    // A viewer gets no session; the attempt is in the audit trail.
    let v = c.cli(&["admin", "users", "create", "vera", "--role", "viewer"]);
    let viewer = c.dir.path().join("viewer-token");
    nembo_tests::write_private(&viewer, text(&v.stdout).trim());
    let out = nembo(&c)
        .env("NEMBO_TOKEN_FILE", &viewer)
        .args(["ssh", "dev", "--", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("PermissionDenied"),
        "{}",
        text(&out.stderr)
    );
    let audit = c.cli(&["admin", "audit", "--json"]);
    let a = text(&audit.stdout);
    assert!(a.contains("\"call\": \"Shell\""), "{a}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_and_scp_go_through_the_proxy_command() {
    let sshd = LoopbackSshd::start().await;
    let c = Coordinator::start(&[]).await;
    let out = c.cli(&["launch", "-c", "box", "echo up"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let proxy = format!(
        "ProxyCommand=env NEMBO_API_INFO={} NEMBO_HOME={} {} ssh box --proxy {}",
        c.dir.path().join("api.json").display(),
        c.dir.path().join("cli-home").display(),
        bin("nembo").display(),
        sshd.port
    );
    let mut ssh = Command::new("ssh");
    ssh.args(sshd.ssh_options())
        .args(["-o", &proxy])
        .arg(format!("{}@box", sshd.user))
        .arg("echo through-the-proxy");
    let out = ssh.output().unwrap();
    assert!(
        out.status.success() && text(&out.stdout).contains("through-the-proxy"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let file = sshd.dir.path().join("payload.txt");
    std::fs::write(&file, "copied by scp\n").unwrap();
    let dest = sshd.dir.path().join("copy.txt");
    let out = Command::new("scp")
        .args(sshd.ssh_options())
        .args(["-o", &proxy])
        .arg(&file)
        .arg(format!("{}@box:{}", sshd.user, dest.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), "copied by scp\n");
}

/// With `wait_for: jobs_and_ssh` (the default), an open session is
/// activity: the idle cluster stops only after the session ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_session_keeps_an_idle_cluster_up() {
    let c = Coordinator::start(&[]).await;
    let out = c.cli(&["launch", "-c", "dev", "-i", "2s", "echo up"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut session = nembo(&c)
        .args(["ssh", "dev", "--", "sleep 5"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the session to count", Duration::from_secs(10), || async {
        (cluster(&c, "dev")["ssh_sessions"] == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(cluster(&c, "dev")["state"], "UP", "kept up by the session");
    assert!(session.wait().unwrap().success());
    wait_for(
        "autostop after the session",
        Duration::from_secs(20),
        || async { (cluster(&c, "dev")["state"] == "STOPPED").then_some(()) },
    )
    .await;
    let client = c.client().await;
    let clusters = client
        .clone()
        .list_clusters(pb::ListClustersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(clusters.clusters[0].ssh_sessions, 0);
}
