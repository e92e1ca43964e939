//! `nembo serve` end to end: real coordinators, local agents, replicas
//! serving HTTP from Python, requests through the load balancer.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nembo_proto::http::HttpClient;
use nembo_proto::v1 as pb;
use nembo_tests::{service, wait_for, Coordinator};

/// A replica: `GET /` answers `<VERSION> replica <id> up <seconds>`;
/// `/health` passes once it has been up `READY_AFTER` seconds and until
/// `GET /break`.
const REPLICA: &str = r#"import http.server, os, sys, time
start = time.time()
broken = False
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def reply(self, code, text):
        body = text.encode()
        self.send_response(code)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        global broken
        up = time.time() - start
        rid = os.environ["SKYPILOT_SERVE_REPLICA_ID"]
        if self.path == "/health":
            ok = up >= float(os.environ.get("READY_AFTER", "0")) and not broken
            self.reply(200 if ok else 503, "ok\n" if ok else "not ready\n")
        elif self.path == "/break":
            broken = True
            self.reply(200, f"broke replica {rid}\n")
        else:
            self.reply(200, f"{os.environ['VERSION']} replica {rid} up {up:.2f}\n")
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["NEMBO_SERVICE_PORT"])), H).serve_forever()
"#;

/// A service task in SkyPilot's format: the replica above, `version`
/// in its answers, and `service` as the `service:` section's body.
fn task(version: &str, ready_after: u32, service: &str) -> String {
    let script = REPLICA
        .lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n");
    format!(
        "name: web\nresources:\n  ports: 8080\nenvs:\n  VERSION: {version}\n  READY_AFTER: '{ready_after}'\n\
         service:\n{service}\nrun: |\n  cat > replica.py <<'EOF'\n{script}\n  EOF\n  exec python3 replica.py\n"
    )
}

const FAST_PROBES: &str =
    "  readiness_probe:\n    path: /health\n    initial_delay_seconds: 60\n    \
    endpoint_probe_interval_seconds: 1\n    timeout_seconds: 2\n    \
    consecutive_failure_threshold_timeout: 3\n  load_balancer:\n    stream_timeout_seconds: 3\n";

fn write_task(c: &Coordinator, name: &str, yaml: &str) -> String {
    let path = c.dir.path().join(name);
    std::fs::write(&path, yaml).expect("write task");
    path.display().to_string()
}

fn cli_ok(c: &Coordinator, args: &[&str]) -> String {
    let out = c.cli(args);
    assert!(
        out.status.success(),
        "nembo {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn get(http: &HttpClient, url: &str) -> (u16, String) {
    let req = http::Request::get(url)
        .body(prost::bytes::Bytes::new())
        .expect("request");
    match http.send(req).await {
        Ok(r) => (r.status, r.text()),
        Err(e) => (0, e.to_string()),
    }
}

/// Waits until the service has `n` READY replicas, and returns it.
async fn ready(c: &Coordinator, name: &str, n: usize, limit: Duration) -> pb::Service {
    let client = c.client().await;
    wait_for(&format!("{n} READY replicas of {name}"), limit, || {
        let client = client.clone();
        async move {
            let s = service(&client, name).await?;
            let ready = s.replicas.iter().filter(|r| r.status == "READY").count();
            (ready == n).then_some(s)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_gates_traffic_and_a_failing_replica_is_replaced() {
    let c = Coordinator::start(&[]).await;
    let path = write_task(
        &c,
        "web.yaml",
        &task("v1", 5, &format!("{FAST_PROBES}  replicas: 2")),
    );
    let out = cli_ok(&c, &["serve", "up", &path, "-n", "web"]);
    assert!(out.contains("Endpoint: http://127.0.0.1:"), "{out}");
    let endpoint = cli_ok(&c, &["serve", "status", "web", "--endpoint"])
        .trim()
        .to_string();
    let http = HttpClient::new(Duration::from_secs(5));

    // Until a replica is READY, the load balancer answers 503 itself; the
    // first answer from a replica comes after its probe passed.
    let (code, body) = get(&http, &endpoint).await;
    assert_eq!((code, body.trim()), (503, "No ready replicas."));
    let first = wait_for("a replica's answer", Duration::from_secs(60), || {
        let (http, endpoint) = (http.clone(), endpoint.clone());
        async move {
            let (code, body) = get(&http, &endpoint).await;
            assert!(code == 200 || code == 503, "{code} {body}");
            (code == 200).then_some(body)
        }
    })
    .await;
    let up: f64 = first
        .split_whitespace()
        .last()
        .and_then(|u| u.parse().ok())
        .expect("uptime");
    assert!(
        up >= 5.0,
        "traffic reached a replica up {up} s, before its probe could pass"
    );

    // Both READY: the traffic goes to both.
    ready(&c, "web", 2, Duration::from_secs(60)).await;
    let mut seen = BTreeSet::new();
    for _ in 0..8 {
        let (code, body) = get(&http, &endpoint).await;
        assert_eq!(code, 200, "{body}");
        seen.insert(
            body.split_whitespace()
                .nth(2)
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert_eq!(seen.len(), 2, "{seen:?}");

    // One replica's probe fails for good: it leaves the load balancer,
    // fails, and a new replica takes its place. No request fails meanwhile.
    let (_, broke) = get(&http, &format!("{endpoint}/break")).await;
    let broken: u32 = broke
        .split_whitespace()
        .last()
        .and_then(|i| i.parse().ok())
        .expect("replica id");
    let client = c.client().await;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut failed = Vec::new();
    let replaced = loop {
        assert!(
            Instant::now() < deadline,
            "no replacement for replica {broken}"
        );
        let (code, body) = get(&http, &endpoint).await;
        if code != 200 {
            failed.push(format!("{code} {body}"));
        }
        let s = service(&client, "web").await.expect("service");
        let gone = s
            .replicas
            .iter()
            .any(|r| r.replica_id == broken && r.status == "FAILED_PROBING");
        let new_ready = s
            .replicas
            .iter()
            .any(|r| r.replica_id > 2 && r.status == "READY");
        if gone && new_ready {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(failed.is_empty(), "requests failed: {failed:?}");
    let shown = cli_ok(&c, &["serve", "status", "web"]);
    assert!(shown.contains("FAILED_PROBING"), "{shown}");
    assert_eq!(
        replaced
            .replicas
            .iter()
            .filter(|r| r.status == "READY")
            .count(),
        2
    );
    // The replica's output is its job's.
    let logs = cli_ok(&c, &["serve", "logs", "web", "1", "--no-follow"]);
    assert!(logs.is_empty() || !logs.contains("Traceback"), "{logs}");

    cli_ok(&c, &["serve", "down", "web", "-y"]);
    wait_for("the endpoint to close", Duration::from_secs(20), || {
        let (http, endpoint) = (http.clone(), endpoint.clone());
        async move { (get(&http, &endpoint).await.0 == 0).then_some(()) }
    })
    .await;
    let jobs = c.jobs().await;
    wait_for("the replicas to stop", Duration::from_secs(30), || async {
        let jobs = c.jobs().await;
        jobs.iter()
            .all(|j| j.state != pb::JobState::Running as i32)
            .then_some(())
    })
    .await;
    assert!(jobs.len() >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_switches_versions_without_a_failed_request() {
    let c = Coordinator::start(&[]).await;
    let v1 = write_task(
        &c,
        "v1.yaml",
        &task("v1", 0, &format!("{FAST_PROBES}  replicas: 2")),
    );
    let v2 = write_task(
        &c,
        "v2.yaml",
        &task("v2", 2, &format!("{FAST_PROBES}  replicas: 2")),
    );
    cli_ok(&c, &["serve", "up", &v1, "-n", "web"]);
    let s = ready(&c, "web", 2, Duration::from_secs(60)).await;
    let endpoint = format!("http://{}", s.endpoints[0]);
    let http = HttpClient::new(Duration::from_secs(5));

    let load = {
        let (http, endpoint) = (http.clone(), endpoint.clone());
        tokio::spawn(async move {
            let mut answers: Vec<(u16, String)> = Vec::new();
            let until = Instant::now() + Duration::from_secs(120);
            while Instant::now() < until {
                let (code, body) = get(&http, &endpoint).await;
                let v2_only = answers.len() > 20
                    && answers[answers.len() - 20..]
                        .iter()
                        .all(|(_, b)| b.starts_with("v2"));
                answers.push((code, body));
                if v2_only {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            answers
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let out = cli_ok(&c, &["serve", "update", "web", &v2]);
    assert!(out.contains("version 2"), "{out}");
    let answers = load.await.expect("load");
    let failed: Vec<_> = answers.iter().filter(|(code, _)| *code != 200).collect();
    assert!(
        failed.is_empty(),
        "requests failed during the update: {failed:?}"
    );
    assert!(answers.first().is_some_and(|(_, b)| b.starts_with("v1")));
    assert!(
        answers.last().is_some_and(|(_, b)| b.starts_with("v2")),
        "the responses never switched to v2: {:?}",
        answers.last()
    );
    // The old replicas go once drained.
    let client = c.client().await;
    wait_for("the v1 replicas to end", Duration::from_secs(60), || {
        let client = client.clone();
        async move {
            let s = service(&client, "web").await?;
            s.replicas
                .iter()
                .filter(|r| r.version == 1)
                .all(|r| r.status == "TERMINATED")
                .then_some(())
        }
    })
    .await;
    cli_ok(&c, &["serve", "down", "web", "-y"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_service_specs_are_refused_with_their_field_path() {
    let c = Coordinator::start(&[]).await;
    let mut client = c.client().await;
    let base = "resources: {ports: 8080}\nrun: 'true'\n";
    for (service, field) in [
        ("service: {readiness_probe: health}", "service.readiness_probe"),
        ("service: {replicas: 2, replica_policy: {min_replicas: 1}}", "service.replicas"),
        (
            "service: {replica_policy: {min_replicas: 3, max_replicas: 2, target_qps_per_replica: 1}}",
            "service.replica_policy.max_replicas",
        ),
        (
            "service: {replica_policy: {min_replicas: 1, max_replicas: 3}}",
            "service.replica_policy.target_qps_per_replica",
        ),
        ("service: {load_balancing_policy: random}", "service.load_balancing_policy"),
        ("service: {replica: 2}", "service.replica"),
        ("service: {ports: 70000}", "service.ports"),
    ] {
        let yaml = format!("{base}{service}\n");
        let err = client
            .serve_up(pb::ServeUpRequest {
                name: "bad".into(),
                task_yaml: yaml.clone(),
                ..Default::default()
            })
            .await
            .expect_err(&yaml);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{yaml}: {err:?}");
        assert!(err.message().starts_with(field), "{yaml}: {}", err.message());
    }
    // A service is not a job, and a job is not a service.
    let err = client
        .submit_job(pb::SubmitJobRequest {
            task: Some(pb::submit_job_request::Task::TaskYaml(format!(
                "{base}service: {{replicas: 1}}\n"
            ))),
            ..Default::default()
        })
        .await
        .expect_err("a service launched as a job");
    assert!(
        err.message().contains("nembo serve up"),
        "{}",
        err.message()
    );
    let err = client
        .serve_up(pb::ServeUpRequest {
            name: "bad".into(),
            task_yaml: base.into(),
            ..Default::default()
        })
        .await
        .expect_err("a job brought up as a service");
    assert!(err.message().starts_with("service:"), "{}", err.message());
    let err = client
        .serve_up(pb::ServeUpRequest {
            name: "Bad Name".into(),
            task_yaml: format!("{base}service: {{replicas: 1}}\n"),
            ..Default::default()
        })
        .await
        .expect_err("a bad name");
    assert!(err.message().starts_with("name:"), "{}", err.message());
    // Nothing was made.
    let listed = client
        .list_services(pb::ListServicesRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(listed.services.is_empty());
    assert!(c.jobs().await.is_empty());
}

/// Two simulated regions with spot capacity: replicas of 2 vCPUs each get
/// a node of their own.
const SPOT_PROVIDERS: &str = "local:\n  simulate: true\n  spot_factor: 0.4\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preempted_replica_leaves_at_once_and_is_replaced_in_another_region() {
    let dir = tempfile::tempdir().unwrap();
    let providers = dir.path().join("providers.yaml");
    std::fs::write(&providers, SPOT_PROVIDERS).unwrap();
    let c = Coordinator::start(&["--providers", providers.to_str().unwrap()]).await;
    let yaml = task("v1", 0, &format!("{FAST_PROBES}  replicas: 2")).replace(
        "resources:\n  ports: 8080\n",
        "resources:\n  ports: 8080\n  cpus: 2\n  use_spot: true\n  infra: local\n",
    );
    let path = write_task(&c, "spot.yaml", &yaml);
    cli_ok(&c, &["serve", "up", &path, "-n", "spot"]);
    let s = ready(&c, "spot", 2, Duration::from_secs(90)).await;
    assert!(s.replicas.iter().all(|r| r.spot), "{s:?}");
    let victim = s.replicas[0].clone();
    assert_ne!(victim.node_id, s.replicas[1].node_id, "one node each");
    let endpoint = format!("http://{}", s.endpoints[0]);
    let http = HttpClient::new(Duration::from_secs(5));

    let load = {
        let (http, endpoint) = (http.clone(), endpoint.clone());
        tokio::spawn(async move {
            let mut failed = Vec::new();
            let mut served_by = Vec::new();
            let until = Instant::now() + Duration::from_secs(25);
            while Instant::now() < until {
                let (code, body) = get(&http, &endpoint).await;
                if code == 200 {
                    served_by.push((Instant::now(), body));
                } else {
                    failed.push(format!("{code} {body}"));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (failed, served_by)
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let noticed = Instant::now();
    cli_ok(
        &c,
        &[
            "local",
            "preempt",
            &victim.node_id,
            "--format",
            "aws",
            "--in",
            "20s",
        ],
    );
    // Out of the load balancer as soon as the notice is in the state, and
    // a replacement on its way at once.
    let client = c.client().await;
    wait_for("the notice to be seen", Duration::from_secs(20), || {
        let client = client.clone();
        async move {
            let s = service(&client, "spot").await?;
            s.replicas
                .iter()
                .any(|r| r.replica_id == victim.replica_id && r.status == "PREEMPTED")
                .then_some(())
        }
    })
    .await;
    let left_after = noticed.elapsed();
    // The replacement is asked for by the service loop's next plan (the
    // notice alone already takes the replica out of the load balancers).
    wait_for("a replacement", Duration::from_secs(10), || {
        let client = client.clone();
        async move {
            service(&client, "spot")
                .await?
                .replicas
                .iter()
                .any(|r| r.replica_id == 3)
                .then_some(())
        }
    })
    .await;
    let (failed, served_by) = load.await.expect("load");
    assert!(
        failed.is_empty(),
        "requests failed during the drain: {failed:?}"
    );
    let victim_name = format!("replica {} ", victim.replica_id);
    let late: Vec<_> = served_by
        .iter()
        .filter(|(at, body)| {
            *at > noticed + left_after + Duration::from_millis(500) && body.contains(&victim_name)
        })
        .collect();
    assert!(
        late.is_empty(),
        "the preempted replica still took traffic: {late:?}"
    );
    // The replacement is READY, in the other region (EAGER_NEXT_REGION).
    let s = wait_for(
        "the replacement to be READY",
        Duration::from_secs(90),
        || {
            let client = client.clone();
            async move {
                let s = service(&client, "spot").await?;
                s.replicas
                    .iter()
                    .any(|r| r.replica_id == 3 && r.status == "READY")
                    .then_some(s)
            }
        },
    )
    .await;
    let region = |r: &pb::ServiceReplica| r.infra.clone();
    let replacement = s.replicas.iter().find(|r| r.replica_id == 3).unwrap();
    assert_ne!(region(replacement), victim.infra, "{s:?}");
    eprintln!(
        "notice -> out of the load balancer: {left_after:?} (as seen by a client polling the API)"
    );
    cli_ok(&c, &["serve", "down", "spot", "-y"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_with_a_token_refuses_callers_without_it() {
    let c = Coordinator::start(&[]).await;
    let yaml = task("v1", 0, &format!("{FAST_PROBES}  replicas: 1")).replacen(
        "envs:\n",
        "secrets:\n  NEMBO_SERVICE_TOKEN: null\nenvs:\n",
        1,
    );
    let path = write_task(&c, "token.yaml", &yaml);
    cli_ok(
        &c,
        &[
            "serve",
            "up",
            &path,
            "-n",
            "private",
            "--env",
            "NEMBO_SERVICE_TOKEN=s3cret-token",
        ],
    );
    let s = ready(&c, "private", 1, Duration::from_secs(60)).await;
    let endpoint = format!("http://{}", s.endpoints[0]);
    let http = HttpClient::new(Duration::from_secs(5));
    let (code, _) = get(&http, &endpoint).await;
    assert_eq!(code, 401);
    let with = |token: &str| {
        http::Request::get(&endpoint)
            .header("authorization", format!("Bearer {token}"))
            .body(prost::bytes::Bytes::new())
            .unwrap()
    };
    assert_eq!(http.send(with("wrong")).await.unwrap().status, 401);
    let r = http.send(with("s3cret-token")).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().starts_with("v1 replica 1"));
    // The token is a secret: status never shows it.
    let shown = cli_ok(&c, &["serve", "status", "--json"]);
    assert!(!shown.contains("s3cret-token"));
    // Nembo's own API tokens are not the service's: neither the cluster's
    // nor a user's opens it.
    assert_eq!(http.send(with(&c.token())).await.unwrap().status, 401);
    let viewer = create_user(&c, "vera", "viewer");
    assert_eq!(http.send(with(&viewer)).await.unwrap().status, 401);
}

/// `nembo admin users create NAME --role ROLE`: the token it prints.
fn create_user(c: &Coordinator, name: &str, role: &str) -> String {
    cli_ok(c, &["admin", "users", "create", name, "--role", role])
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_services_owner_changes_it_and_it_serves_again_after_a_restart() {
    let mut c = Coordinator::start(&[]).await;
    let path = write_task(
        &c,
        "web.yaml",
        &task("v1", 0, &format!("{FAST_PROBES}  replicas: 1")),
    );
    cli_ok(&c, &["serve", "up", &path, "-n", "web"]);
    let s = ready(&c, "web", 1, Duration::from_secs(60)).await;
    let yaml = std::fs::read_to_string(&path).unwrap();
    // Another user may see it, not change it; a viewer may not bring one up.
    let bob = c.client_with_token(&create_user(&c, "bob", "user")).await;
    let err = bob
        .clone()
        .serve_update(pb::ServeUpdateRequest {
            name: "web".into(),
            task_yaml: yaml.clone(),
            ..Default::default()
        })
        .await
        .expect_err("bob updates root's service");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("belongs to root"),
        "{}",
        err.message()
    );
    let err = bob
        .clone()
        .serve_down(pb::ServeDownRequest { name: "web".into() })
        .await
        .expect_err("bob takes root's service down");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(service(&bob, "web").await.is_some(), "users list services");
    let vera = c
        .client_with_token(&create_user(&c, "vera", "viewer"))
        .await;
    let err = vera
        .clone()
        .serve_up(pb::ServeUpRequest {
            name: "mine".into(),
            task_yaml: yaml,
            ..Default::default()
        })
        .await
        .expect_err("a viewer brings a service up");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let client = c.client().await;
    assert_eq!(service(&client, "web").await.unwrap().version, 1);

    // kill -9 and a restart: the load balancer opens again, on the same
    // port, from the replayed state; the replica kept running meanwhile.
    let endpoint = format!("http://{}", s.endpoints[0]);
    let http = HttpClient::new(Duration::from_secs(5));
    c.restart().await;
    wait_for(
        "the service after the restart",
        Duration::from_secs(60),
        || {
            let (http, endpoint) = (http.clone(), endpoint.clone());
            async move {
                let (code, body) = get(&http, &endpoint).await;
                (code == 200 && body.starts_with("v1 replica 1")).then_some(())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_coordinators_keep_serving_when_the_leader_is_killed() {
    let mut cluster = nembo_tests::Cluster::start(3, &[]).await;
    let client = cluster.client();
    let yaml = task("v1", 0, &format!("{FAST_PROBES}  replicas: 2"));
    client
        .clone()
        .serve_up(pb::ServeUpRequest {
            name: "ha".into(),
            task_yaml: yaml,
            ..Default::default()
        })
        .await
        .expect("serve up");
    let s = wait_for("2 READY replicas", Duration::from_secs(90), || {
        let client = client.clone();
        async move {
            let s = service(&client, "ha").await?;
            (s.replicas.iter().filter(|r| r.status == "READY").count() == 2).then_some(s)
        }
    })
    .await;
    // Members on one host share the port: one endpoint, three listeners.
    assert_eq!(s.endpoints.len(), 1, "{s:?}");
    let endpoint = format!("http://{}", s.endpoints[0]);
    let http = HttpClient::new(Duration::from_secs(5));
    let load = {
        let (http, endpoint) = (http.clone(), endpoint.clone());
        tokio::spawn(async move {
            let mut results = Vec::new();
            let until = Instant::now() + Duration::from_secs(15);
            while Instant::now() < until {
                let (code, _) = get(&http, &endpoint).await;
                results.push((Instant::now(), code));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            results
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let leader = cluster.leader().await;
    let killed = Instant::now();
    cluster.kill9(leader);
    let results = load.await.expect("load");
    let failed = results.iter().filter(|(_, code)| *code != 200).count();
    let after: Vec<u16> = results
        .iter()
        .filter(|(at, _)| *at > killed + Duration::from_secs(1))
        .map(|(_, c)| *c)
        .collect();
    eprintln!(
        "leader killed under load: {failed} of {} requests failed; {} after the first second, all answered",
        results.len(),
        after.len()
    );
    assert!(
        after.len() > 100,
        "too few requests after the kill: {}",
        after.len()
    );
    assert!(
        after.iter().all(|c| *c == 200),
        "requests failed after the leader's death: {:?}",
        after.iter().filter(|c| **c != 200).count()
    );
    assert!(failed <= 5, "{failed} requests failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_fallback_stands_in_until_spot_is_ready_then_goes() {
    let dir = tempfile::tempdir().unwrap();
    let providers = dir.path().join("providers.yaml");
    std::fs::write(&providers, SPOT_PROVIDERS).unwrap();
    let c = Coordinator::start(&["--providers", providers.to_str().unwrap()]).await;
    let policy = "  replica_policy:\n    min_replicas: 1\n    max_replicas: 1\n    dynamic_ondemand_fallback: true";
    // The spot replica is slow to turn READY: the on-demand one stands in.
    let yaml = task("v1", 4, &format!("{FAST_PROBES}{policy}")).replace(
        "resources:\n  ports: 8080\n",
        "resources:\n  ports: 8080\n  use_spot: true\n  infra: local\n",
    );
    let path = write_task(&c, "fallback.yaml", &yaml);
    cli_ok(&c, &["serve", "up", &path, "-n", "fb"]);
    let client = c.client().await;
    let s = service(&client, "fb").await.expect("service");
    let spot: Vec<bool> = s.replicas.iter().map(|r| r.spot).collect();
    assert_eq!(
        spot,
        vec![true, false],
        "one spot, one on-demand stand-in: {s:?}"
    );
    // Once the spot replica is READY, the stand-in goes.
    let s = wait_for(
        "the on-demand stand-in to go",
        Duration::from_secs(90),
        || {
            let client = client.clone();
            async move {
                let s = service(&client, "fb").await?;
                let spot_ready = s.replicas.iter().any(|r| r.spot && r.status == "READY");
                let od_gone = s
                    .replicas
                    .iter()
                    .filter(|r| !r.spot)
                    .all(|r| matches!(r.status.as_str(), "SHUTTING_DOWN" | "TERMINATED"));
                (spot_ready && od_gone).then_some(s)
            }
        },
    )
    .await;
    assert_eq!(
        s.replicas.iter().filter(|r| r.status == "READY").count(),
        1,
        "{s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_scales_from_zero_on_a_request_up_under_load_and_back_to_zero() {
    let c = Coordinator::start(&[]).await;
    let policy = "  replica_policy:\n    min_replicas: 0\n    max_replicas: 2\n    target_qps_per_replica: 1\n    upscale_delay_seconds: 2\n    downscale_delay_seconds: 2";
    let path = write_task(
        &c,
        "auto.yaml",
        &task("v1", 0, &format!("{FAST_PROBES}{policy}")),
    );
    cli_ok(&c, &["serve", "up", &path, "-n", "auto"]);
    let client = c.client().await;
    let s = service(&client, "auto").await.expect("service");
    assert_eq!((s.status.as_str(), s.replicas.len()), ("NO_REPLICA", 0));
    let endpoint = format!("http://{}", s.endpoints[0]);
    // The first request waits for a replica rather than failing.
    let http = HttpClient::new(Duration::from_secs(90));
    let started = Instant::now();
    let (code, body) = get(&http, &endpoint).await;
    assert_eq!(code, 200, "{body}");
    eprintln!("cold start: the first request took {:?}", started.elapsed());
    // About 10 requests a second: 2 replicas at 1 QPS each.
    let load = {
        let (http, endpoint) = (http.clone(), endpoint.clone());
        tokio::spawn(async move {
            let mut failed = 0;
            let until = Instant::now() + Duration::from_secs(20);
            while Instant::now() < until {
                if get(&http, &endpoint).await.0 != 200 {
                    failed += 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            failed
        })
    };
    ready(&c, "auto", 2, Duration::from_secs(60)).await;
    assert_eq!(load.await.expect("load"), 0, "requests failed under load");
    // The load gone, the rate over the last minute falls, and with it the
    // replicas, down to none.
    let s = wait_for("scale back to zero", Duration::from_secs(150), || {
        let client = client.clone();
        async move {
            let s = service(&client, "auto").await?;
            let live = s
                .replicas
                .iter()
                .filter(|r| !matches!(r.status.as_str(), "TERMINATED" | "SHUTTING_DOWN"))
                .count();
            (s.target_replicas == 0 && live == 0).then_some(s)
        }
    })
    .await;
    assert_eq!(s.status, "NO_REPLICA");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_with_tls_is_served_over_https() {
    let c = Coordinator::start(&[]).await;
    // `CertificateParams::new` puts "127.0.0.1" in as an IP address SAN.
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (certfile, keyfile) = (c.dir.path().join("lb.pem"), c.dir.path().join("lb.key"));
    std::fs::write(&certfile, cert.pem()).unwrap();
    std::fs::write(&keyfile, key.serialize_pem()).unwrap();
    let tls = format!(
        "  tls:\n    certfile: {}\n    keyfile: {}\n",
        certfile.display(),
        keyfile.display()
    );
    let path = write_task(
        &c,
        "tls.yaml",
        &task("v1", 0, &format!("{FAST_PROBES}{tls}  replicas: 1")),
    );
    cli_ok(&c, &["serve", "up", &path, "-n", "secure"]);
    let s = ready(&c, "secure", 1, Duration::from_secs(60)).await;
    let url = cli_ok(&c, &["serve", "status", "secure", "--endpoint"]);
    assert_eq!(url.trim(), format!("https://{}", s.endpoints[0]));
    for http2 in [false, true] {
        let mut curl = std::process::Command::new("curl");
        curl.args(["-s", "--max-time", "10", "--cacert"])
            .arg(&certfile)
            .arg(url.trim());
        if http2 {
            curl.arg("--http2");
        }
        let out = curl.output().expect("curl");
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(body.starts_with("v1 replica 1"), "http2 {http2}: {body}");
    }
    // Plain HTTP is not served on it.
    let http = HttpClient::new(Duration::from_secs(5));
    let plain = format!("http://{}", s.endpoints[0]);
    assert_ne!(get(&http, &plain).await.0, 200);
    // An update without `tls:` reopens the listener in plain HTTP.
    let v2 = write_task(
        &c,
        "plain.yaml",
        &task("v2", 0, &format!("{FAST_PROBES}  replicas: 1")),
    );
    cli_ok(&c, &["serve", "update", "secure", &v2]);
    wait_for("plain HTTP from v2", Duration::from_secs(60), || {
        let (http, plain) = (http.clone(), plain.clone());
        async move {
            let (code, body) = get(&http, &plain).await;
            (code == 200 && body.starts_with("v2")).then_some(())
        }
    })
    .await;
}
