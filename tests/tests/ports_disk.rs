//! `ports` and `disk_size` on the local provider: a job's ports are on
//! 127.0.0.1 and `nembo status --endpoints` says where; a disk larger than
//! the machine has free is refused at submit, naming the field.

use std::io::{Read, Write};
use std::time::Duration;

use nembo_proto::v1 as pb;
use nembo_tests::{wait_for, Coordinator};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_port_is_served_on_the_node_and_status_gives_its_endpoint() {
    let c = Coordinator::start(&[]).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let job = c
        .submit(&format!(
            "resources: {{ports: {port}}}\nrun: |\n  mkdir -p site && echo served by nembo > site/index.html\n  cd site && exec python3 -m http.server {port} --bind 127.0.0.1\n"
        ))
        .await;
    c.wait_state(&job, pb::JobState::Running, Duration::from_secs(60))
        .await;
    let out = c.cli(&["status", "--endpoints", &job]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(line, format!("{port}: 127.0.0.1:{port}"));
    let out = c.cli(&["status", "--endpoint", &port.to_string(), &job]);
    let addr = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let body = wait_for("the job's server", Duration::from_secs(20), || {
        let addr = addr.clone();
        async move {
            let mut s = std::net::TcpStream::connect(&addr).ok()?;
            s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").ok()?;
            let mut r = String::new();
            s.read_to_string(&mut r).ok()?;
            r.contains("served by nembo").then_some(r)
        }
    })
    .await;
    assert!(body.starts_with("HTTP/1.0 200"), "{body}");
    let other = c.cli(&["status", "--endpoint", "1", &job]);
    assert!(!other.status.success());
    assert!(String::from_utf8_lossy(&other.stderr).contains("does not open port 1"));
    c.cli(&["cancel", &job]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ports_and_impossible_disks_are_refused_naming_the_field() {
    let c = Coordinator::start(&[]).await;
    let mut client = c.client().await;
    for (yaml, field, says) in [
        (
            "resources: {ports: 0}\nrun: 'true'\n",
            "resources.ports",
            "not a port",
        ),
        (
            "resources: {ports: 70000}\nrun: 'true'\n",
            "resources.ports",
            "not a port",
        ),
        (
            "resources: {ports: '9000-8000'}\nrun: 'true'\n",
            "resources.ports",
            "after its end",
        ),
        (
            "resources: {ports: [80, x]}\nrun: 'true'\n",
            "resources.ports[1]",
            "not a port",
        ),
        (
            "resources: {disk_size: 0}\nrun: 'true'\n",
            "resources.disk_size",
            "positive",
        ),
        (
            "resources: {disk_size: 100MB}\nrun: 'true'\n",
            "resources.disk_size",
            "at least 1 GB",
        ),
        (
            "resources: {disk_size: 5PB}\nrun: 'true'\n",
            "resources.disk_size",
            "local: up to",
        ),
        (
            "resources: {disk_tier: fastest}\nrun: 'true'\n",
            "resources.disk_tier",
            "expected low",
        ),
        (
            "resources: {image_id: ami-0abc}\nrun: 'true'\n",
            "resources.image_id",
            "no enabled provider boots",
        ),
    ] {
        let e = client
            .submit_job(pb::SubmitJobRequest {
                task: Some(pb::submit_job_request::Task::TaskYaml(yaml.into())),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            e.code(),
            tonic::Code::InvalidArgument,
            "{yaml}: {}",
            e.message()
        );
        assert!(
            e.message().starts_with(field) && e.message().contains(says),
            "{yaml}: {}",
            e.message()
        );
    }
    assert!(c.jobs().await.is_empty());
    // A disk the machine has room for is fine.
    let job = c
        .submit(
            "resources: {disk_size: 1, disk_tier: best, ports: [8000-8002, 8001]}\nrun: echo ok\n",
        )
        .await;
    let done = c
        .wait_state(&job, pb::JobState::Succeeded, Duration::from_secs(60))
        .await;
    let ports = &done.spec.unwrap().resources.unwrap().candidates[0].ports;
    assert_eq!(ports, &vec!["8000-8002".to_string()]);
}

/// A node that the world reaches at another address (a cloud VM's public
/// IP, which its bootstrap passes as `--public-address`) reports it beside
/// the address its peers use; `nembo status --endpoints` prints it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_public_address_is_reported_beside_its_private_one() {
    let c = Coordinator::start(&[]).await;
    let out = c.cli(&["admin", "tokens", "create", "--ttl", "1h", "--uses", "1"]);
    assert!(out.status.success());
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let work = c.dir.path().join("manual-node");
    std::fs::create_dir_all(&work).unwrap();
    let token_file = work.join("join-token");
    nembo_tests::write_private(&token_file, &token);
    let mut agent = std::process::Command::new(nembo_tests::bin("nembo-agent"))
        .args(["--coordinator", &c.endpoint()])
        .arg("--ca-cert")
        .arg(c.info["ca_cert_path"].as_str().unwrap())
        .arg("--join-token-file")
        .arg(&token_file)
        .arg("--work-dir")
        .arg(&work)
        .args(["--heartbeat-ms", "200", "--cpus", "2", "--memory-gb", "4"])
        .args(["--address", "10.1.2.3", "--public-address", "203.0.113.9"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let node = wait_for(
        "the node to report both addresses",
        Duration::from_secs(30),
        || async {
            c.nodes()
                .await
                .into_iter()
                .find(|n| n.public_address == "203.0.113.9")
        },
    )
    .await;
    assert_eq!(node.address, "10.1.2.3", "peers keep the private address");
    let _ = agent.kill();
    let _ = agent.wait();
}
