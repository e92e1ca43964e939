//! `bench_clusters`: the interactive loop on a warm cluster, measured with
//! the real CLI as a user types it. `--rounds` (default 30) of:
//!
//! - `nembo exec NAME 'echo first'`: from starting the CLI to the job's
//!   first output line on its stdout (submit, schedule, run, ship the log,
//!   stream it back);
//! - `nembo ssh NAME -- true`: the whole round trip (connect, open a
//!   session over the agent's session, run, exit code back);
//! - the anchor, in the same run: `ssh -p PORT user@127.0.0.1 true` against
//!   a loopback sshd (key auth, a fresh connection each time, as `nembo ssh`
//!   makes one).
//!
//! `cargo build --release --workspace && target/release/bench_clusters`

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

use nembo_tests::{bin, cli_arg, percentile, Coordinator, LoopbackSshd};
use serde_json::json;

fn nembo(c: &Coordinator) -> Command {
    let mut cmd = Command::new(bin("nembo"));
    cmd.env("NEMBO_API_INFO", c.dir.path().join("api.json"))
        .env("NEMBO_HOME", c.dir.path().join("cli-home"));
    cmd
}

/// Milliseconds from spawning `cmd` to its first stdout line (and to its
/// exit).
fn first_line_ms(mut cmd: Command) -> (f64, f64) {
    let t = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    stdout.read_line(&mut line).expect("read");
    let first = t.elapsed().as_secs_f64() * 1e3;
    std::io::copy(&mut stdout, &mut std::io::sink()).expect("read the rest");
    assert!(child.wait().expect("wait").success(), "{line}");
    (first, t.elapsed().as_secs_f64() * 1e3)
}

fn run_ms(mut cmd: Command) -> f64 {
    let t = Instant::now();
    let out = cmd.stdin(Stdio::null()).output().expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed().as_secs_f64() * 1e3
}

fn stats(v: &mut [f64]) -> serde_json::Value {
    json!({"p50": percentile(v, 0.5), "p95": percentile(v, 0.95), "max": percentile(v, 1.0)})
}

#[tokio::main]
async fn main() {
    let rounds = cli_arg("--rounds", 30) as usize;
    let sshd = LoopbackSshd::start().await;
    let c = Coordinator::start(&[]).await;
    let out = c.cli(&["launch", "-c", "bench", "echo warm"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (mut exec_first, mut exec_total, mut nembo_ssh, mut plain_ssh) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let mut cmd = nembo(&c);
        cmd.args(["exec", "bench", "echo first; sleep 0.2; echo second"]);
        let (first, total) = first_line_ms(cmd);
        exec_first.push(first);
        exec_total.push(total);
        let mut cmd = nembo(&c);
        cmd.args(["ssh", "bench", "--", "true"]);
        nembo_ssh.push(run_ms(cmd));
        let mut cmd = Command::new("ssh");
        cmd.args(sshd.ssh_options())
            .args(["-p", &sshd.port.to_string()])
            .arg(format!("{}@127.0.0.1", sshd.user))
            .arg("true");
        plain_ssh.push(run_ms(cmd));
    }
    let ratio = percentile(&mut nembo_ssh, 0.5) / percentile(&mut plain_ssh, 0.5);
    println!("what                                   p50 ms   p95 ms");
    for (name, v) in [
        ("nembo exec: first output line", &mut exec_first),
        ("nembo exec: whole (job runs 0.2 s)", &mut exec_total),
        ("nembo ssh NAME -- true", &mut nembo_ssh),
        ("ssh 127.0.0.1 true (anchor)", &mut plain_ssh),
    ] {
        println!(
            "{name:<37} {:>7.1} {:>8.1}",
            percentile(v, 0.5),
            percentile(v, 0.95)
        );
    }
    println!("nembo ssh / ssh at p50: {ratio:.2}x");
    let out = json!({
        "rounds": rounds,
        "exec_first_line_ms": stats(&mut exec_first),
        "exec_total_ms": stats(&mut exec_total),
        "nembo_ssh_true_ms": stats(&mut nembo_ssh),
        "anchor_ssh_true_ms": stats(&mut plain_ssh),
        "ssh_ratio_p50": ratio,
    });
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
}
