//! Agent and member identity (issue 7), tested as an attacker would: join
//! tokens reused, expired, revoked or forged; certificates from another CA,
//! expired, or for another node; a revoked node coming back; a certificate
//! that is not a member's speaking Raft; plaintext and downgraded TLS.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nembo_proto::agent::v1 as apb;
use nembo_proto::agent::v1::session_request::Msg as AgentMsg;
use nembo_proto::raft::v1::raft_peer_service_client::RaftPeerServiceClient;
use nembo_proto::v1 as pb;
use nembo_tests::{bin, wait_for, write_private, Coordinator};
use rcgen::{CertificateParams, DnType, IsCa, KeyPair};
use tonic::Code;

/// `nembo-agent` on this machine, joining with `token` (no node id).
fn agent(c: &Coordinator, work: &Path, token: &str) -> Child {
    std::fs::create_dir_all(work).unwrap();
    let token_file = work.join("join-token");
    write_private(&token_file, token);
    Command::new(bin("nembo-agent"))
        .args(["--coordinator", &c.endpoint()])
        .arg("--ca-cert")
        .arg(c.info["ca_cert_path"].as_str().unwrap())
        .arg("--join-token-file")
        .arg(&token_file)
        .arg("--work-dir")
        .arg(work)
        .args(["--heartbeat-ms", "200", "--cpus", "4", "--memory-gb", "16"])
        .env("NEMBO_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(work.join("agent.log")).unwrap(),
        ))
        .spawn()
        .unwrap()
}

/// Runs an agent that should be refused; returns its log once it exits.
async fn refused_agent(c: &Coordinator, work: &Path, token: &str) -> String {
    let mut child = agent(c, work, token);
    let status = wait_for("the agent to give up", Duration::from_secs(20), || {
        let s = child.try_wait().unwrap();
        async move { s }
    })
    .await;
    assert!(!status.success());
    std::fs::read_to_string(work.join("agent.log")).unwrap()
}

/// `nembo admin tokens create ...`: (token, id).
fn join_token(c: &Coordinator, ttl: &str) -> (String, String) {
    let out = c.cli(&["admin", "tokens", "create", "--ttl", ttl, "--uses", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let id = token
        .strip_prefix("nembo-join.")
        .and_then(|t| t.split('.').next())
        .expect("nembo-join.<id>.<secret>")
        .to_string();
    (token, id)
}

fn tokens(c: &Coordinator) -> Vec<serde_json::Value> {
    let out = c.cli(&["admin", "tokens", "list", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_enroll_once_and_a_revoked_node_is_cut_off_for_good() {
    let c = Coordinator::start(&[]).await;
    let (token, id) = join_token(&c, "1h");
    let work = c.dir.path().join("box-1");
    let mut child = agent(&c, &work, &token);
    let node = wait_for("the machine to join", Duration::from_secs(20), || async {
        c.nodes()
            .await
            .into_iter()
            .find(|n| n.provider == "manual" && n.state == pb::NodeState::Ready as i32)
    })
    .await;
    // It declared its own shape; Nembo names it.
    assert_eq!(node.resources.as_ref().map(|r| r.cpus), Some(4.0));
    // The token is spent and gone from the machine; the key is private.
    assert!(!work.join("join-token").exists());
    let mode = std::fs::metadata(work.join("identity/node.key"))
        .unwrap()
        .permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o077, 0);
    let listed = tokens(&c);
    let t = listed.iter().find(|t| t["id"] == id.as_str()).unwrap();
    assert_eq!(t["uses_left"], 0);
    assert_eq!(t["node_ids"][0], node.node_id.as_str());

    // Used, expired, revoked, forged: each refused, and the agent says why.
    let log = refused_agent(&c, &c.dir.path().join("again"), &token).await;
    assert!(log.contains("join token already used"), "{log}");
    let (short, _) = join_token(&c, "1s");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let log = refused_agent(&c, &c.dir.path().join("late"), &short).await;
    assert!(log.contains("join token expired"), "{log}");
    let (revoked, revoked_id) = join_token(&c, "1h");
    assert!(c
        .cli(&["admin", "tokens", "revoke", &revoked_id])
        .status
        .success());
    let log = refused_agent(&c, &c.dir.path().join("revoked"), &revoked).await;
    assert!(log.contains("join token revoked"), "{log}");
    let forged = format!("nembo-join.{id}.{}", "0".repeat(64));
    let log = refused_agent(&c, &c.dir.path().join("forged"), &forged).await;
    assert!(log.contains("invalid join token"), "{log}");
    assert_eq!(
        c.nodes()
            .await
            .iter()
            .filter(|n| n.provider == "manual")
            .count(),
        1,
        "no refused agent became a node"
    );

    // Revoked: the session ends at once, the agent stops, the node goes.
    let out = c.cli(&["admin", "nodes", "revoke", &node.node_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = wait_for("the revoked agent to stop", Duration::from_secs(10), || {
        let s = child.try_wait().unwrap();
        async move { s }
    })
    .await;
    assert!(!status.success());
    let log = std::fs::read_to_string(work.join("agent.log")).unwrap();
    assert!(log.contains("revoked"), "{log}");
    let gone = wait_for(
        "the node to be terminated",
        Duration::from_secs(10),
        || async {
            c.nodes()
                .await
                .into_iter()
                .find(|n| n.node_id == node.node_id && n.state == pb::NodeState::Terminated as i32)
        },
    )
    .await;
    assert!(gone.revoke_time.is_some());
    // Its certificate, still within its dates, opens nothing.
    let (cert, key) = (
        std::fs::read(work.join("identity/node.pem")).unwrap(),
        std::fs::read(work.join("identity/node.key")).unwrap(),
    );
    let mut client = nembo_proto::client::connect_agent_tls(&c.endpoint(), &c.ca(), &cert, &key)
        .await
        .unwrap();
    let err = client.session(hello(&node.node_id)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("revoked"));
    let err = client
        .renew(apb::RenewRequest {
            public_key: KeyPair::generate().unwrap().public_key_raw().to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // The audit trail has the enrollment and the revocation.
    let out = c.cli(&["admin", "audit", "--json"]);
    let audit = String::from_utf8_lossy(&out.stdout);
    assert!(audit.contains(&format!("join token {id}")), "{audit}");
    assert!(audit.contains("RevokeNode"), "{audit}");
}

fn hello(node: &str) -> impl tonic::IntoStreamingRequest<Message = apb::SessionRequest> {
    let msg = apb::SessionRequest {
        msg: Some(AgentMsg::Hello(apb::Hello {
            node_id: node.into(),
            ..Default::default()
        })),
    };
    // The stream stays open (pending) after the hello, as an agent's does.
    tokio_stream::StreamExt::chain(tokio_stream::iter(vec![msg]), tokio_stream::pending())
}

/// A certificate for `names`, signed by `issuer` (cert PEM, key PEM), or
/// self-made CA when none; valid in `[from, to]` years.
fn cert_for(names: &[&str], issuer: Option<(&str, &str)>, years: (i32, i32)) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, "attacker");
    p.not_before = rcgen::date_time_ymd(years.0, 1, 1);
    p.not_after = rcgen::date_time_ymd(years.1, 1, 1);
    let cert = match issuer {
        Some((ca_pem, ca_key)) => {
            let ca_key = KeyPair::from_pem(ca_key).unwrap();
            let ca = CertificateParams::from_ca_cert_pem(ca_pem)
                .unwrap()
                .self_signed(&ca_key)
                .unwrap();
            p.signed_by(&key, &ca, &ca_key).unwrap()
        }
        None => {
            let ca_key = KeyPair::generate().unwrap();
            let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
            ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            ca.distinguished_name
                .push(DnType::CommonName, "Nembo cluster CA");
            let ca = ca.self_signed(&ca_key).unwrap();
            p.signed_by(&key, &ca, &ca_key).unwrap()
        }
    };
    (cert.pem(), key.serialize_pem())
}

async fn session_code(c: &Coordinator, cert: &str, key: &str, node: &str) -> Option<Code> {
    let client = nembo_proto::client::connect_agent_tls(
        &c.endpoint(),
        &c.ca(),
        cert.as_bytes(),
        key.as_bytes(),
    )
    .await;
    match client {
        // The handshake itself failed.
        Err(_) => None,
        Ok(mut client) => match client.session(hello(node)).await {
            Ok(_) => Some(Code::Ok),
            Err(s) => Some(s.code()),
        },
    }
}

async fn raft_code(c: &Coordinator, identity: Option<(&[u8], &[u8])>, from: u64) -> Option<Code> {
    let channel = nembo_proto::client::endpoint_with_identity(&c.endpoint(), &c.ca(), identity)
        .unwrap()
        .connect()
        .await
        .ok()?;
    let batch = nembo_proto::raft::v1::StreamRequest {
        from,
        messages: Vec::new(),
    };
    match RaftPeerServiceClient::new(channel)
        .stream(tokio_stream::iter(vec![batch]))
        .await
    {
        Ok(_) => Some(Code::Ok),
        Err(s) => Some(s.code()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_prove_only_what_they_name() {
    let c = Coordinator::start(&[]).await;
    let tls = c.dir.path().join("tls");
    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
    let (ca_pem, ca_key) = (read(tls.join("ca.pem")), read(tls.join("ca.key")));
    // A real agent identity, enrolled through the RPC.
    let (token, _) = join_token(&c, "1h");
    let key = KeyPair::generate().unwrap();
    let mut enrollment = nembo_proto::client::connect_enrollment(&c.endpoint(), &c.ca())
        .await
        .unwrap();
    let bad_key = enrollment
        .enroll(apb::EnrollRequest {
            join_token: token.clone(),
            public_key: vec![4; 10],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_key.code(), Code::InvalidArgument);
    let issued = enrollment
        .enroll(apb::EnrollRequest {
            join_token: token,
            public_key: key.public_key_raw().to_vec(),
            hostname: "box".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .certificate
        .unwrap();
    let node = issued.node_id.clone();
    let (cert, key) = (issued.certificate_pem, key.serialize_pem());
    assert!(issued.not_after_unix_ms > issued.not_before_unix_ms);
    assert_eq!(session_code(&c, &cert, &key, &node).await, Some(Code::Ok));
    // A leaked admin token cannot make its holder an existing node (and get
    // that node's jobs and secrets); only a token made for the node can.
    let (other, _) = join_token(&c, "1h");
    let takeover = enrollment
        .enroll(apb::EnrollRequest {
            join_token: other,
            node_id: node.clone(),
            public_key: KeyPair::generate().unwrap().public_key_raw().to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(takeover.code(), Code::PermissionDenied, "{takeover:?}");
    let out = c.cli(&["admin", "tokens", "create", "--node", &node]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let for_node = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let reenrolled = enrollment
        .enroll(apb::EnrollRequest {
            join_token: for_node,
            node_id: node.clone(),
            public_key: KeyPair::generate().unwrap().public_key_raw().to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .certificate
        .unwrap();
    assert_eq!(reenrolled.node_id, node);
    // The same certificate cannot speak for another node.
    assert_eq!(
        session_code(&c, &cert, &key, "node-99").await,
        Some(Code::PermissionDenied)
    );
    // Another CA's certificate, even one naming this node: no handshake.
    let name = format!("{node}.node.nembo");
    let (foreign, foreign_key) = cert_for(&[&name], None, (2020, 2090));
    let code = session_code(&c, &foreign, &foreign_key, &node).await;
    assert!(
        !matches!(
            code,
            Some(Code::Ok | Code::PermissionDenied | Code::NotFound)
        ),
        "{code:?}"
    );
    // The cluster's own CA, but expired: no handshake either.
    let (expired, expired_key) = cert_for(&[&name], Some((&ca_pem, &ca_key)), (2020, 2021));
    let code = session_code(&c, &expired, &expired_key, &node).await;
    assert!(!matches!(code, Some(Code::Ok)), "{code:?}");
    // A coordinator's certificate is not an agent's.
    let member = (read(tls.join("server.pem")), read(tls.join("server.key")));
    assert_eq!(
        session_code(&c, &member.0, &member.1, &node).await,
        Some(Code::Unauthenticated)
    );
    // Raft: only member 1's certificate speaks as member 1.
    let (m_cert, m_key) = (member.0.as_bytes(), member.1.as_bytes());
    assert_eq!(
        raft_code(&c, Some((m_cert, m_key)), 1).await,
        Some(Code::Ok)
    );
    assert_eq!(
        raft_code(&c, Some((m_cert, m_key)), 2).await,
        Some(Code::PermissionDenied),
        "a member posing as another"
    );
    assert_eq!(
        raft_code(&c, Some((cert.as_bytes(), key.as_bytes())), 1).await,
        Some(Code::PermissionDenied),
        "an agent's certificate (same CA) joining Raft"
    );
    assert_eq!(raft_code(&c, None, 1).await, Some(Code::PermissionDenied));
    let (fake_member, fake_key) = cert_for(&["nembo-member-1"], None, (2020, 2090));
    let code = raft_code(&c, Some((fake_member.as_bytes(), fake_key.as_bytes())), 1).await;
    assert!(!matches!(code, Some(Code::Ok)), "{code:?}");
    // Renewal gives a fresh certificate for the same node only.
    let new_key = KeyPair::generate().unwrap();
    let mut client = nembo_proto::client::connect_agent_tls(
        &c.endpoint(),
        &c.ca(),
        cert.as_bytes(),
        key.as_bytes(),
    )
    .await
    .unwrap();
    let renewed = client
        .renew(apb::RenewRequest {
            public_key: new_key.public_key_raw().to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .certificate
        .unwrap();
    assert_eq!(renewed.node_id, node);
    assert_eq!(
        session_code(
            &c,
            &renewed.certificate_pem,
            &new_key.serialize_pem(),
            &node
        )
        .await,
        Some(Code::Ok)
    );
}

/// A TLS ClientHello record offering `version` and `suites`, with the
/// extensions an ECDHE handshake needs.
fn client_hello(version: [u8; 2], suites: &[u16], tls13: bool) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend(version);
    body.extend([7u8; 32]);
    body.push(0);
    body.extend(((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend(s.to_be_bytes());
    }
    body.extend([1, 0]);
    let mut ext: Vec<u8> = Vec::new();
    ext.extend([0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x1d]); // groups: x25519
    ext.extend([0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]); // point formats
    ext.extend([0x00, 0x0d, 0x00, 0x04, 0x00, 0x02, 0x04, 0x03]); // ecdsa_secp256r1_sha256
    if tls13 {
        ext.extend([0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]); // supported_versions: 1.3
        let mut share = vec![0x00, 0x1d, 0x00, 0x20];
        share.extend([9u8; 32]);
        ext.extend([0x00, 0x33]);
        ext.extend(((share.len() + 2) as u16).to_be_bytes());
        ext.extend((share.len() as u16).to_be_bytes());
        ext.extend(share);
    }
    body.extend((ext.len() as u16).to_be_bytes());
    body.extend(ext);
    let mut hs = vec![1u8];
    hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend((hs.len() as u16).to_be_bytes());
    record.extend(hs);
    record
}

/// The first byte the server answers `hello` with: 0x16 a handshake
/// (ServerHello), 0x15 an alert; None if it just closed.
fn first_reply(addr: &str, hello: &[u8]) -> Option<u8> {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(hello).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(1) => Some(b[0]),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_downgraded_tls_are_refused() {
    let c = Coordinator::start(&[]).await;
    let addr = c.endpoint().trim_start_matches("https://").to_string();
    // Controls: modern hellos get a ServerHello, so the probe itself works.
    assert_eq!(
        first_reply(&addr, &client_hello([3, 3], &[0xc02b], false)),
        Some(0x16),
        "TLS 1.2 with ECDHE-ECDSA-AES128-GCM"
    );
    assert_eq!(
        first_reply(&addr, &client_hello([3, 3], &[0x1301], true)),
        Some(0x16),
        "TLS 1.3"
    );
    // Downgrades: old protocol versions, or only weak suites (RSA key
    // exchange, CBC, RC4, export, NULL).
    for (what, version, suites) in [
        ("TLS 1.0", [3, 1], vec![0xc02b, 0x002f]),
        ("TLS 1.1", [3, 2], vec![0xc02b, 0x002f]),
        ("SSL 3.0", [3, 0], vec![0x002f]),
        ("RSA-AES-CBC", [3, 3], vec![0x002f, 0x0035, 0x003c]),
        (
            "RC4, 3DES, export, NULL",
            [3, 3],
            vec![0x0005, 0x000a, 0x0003, 0x0001, 0x0002],
        ),
        ("ECDHE-CBC", [3, 3], vec![0xc009, 0xc00a, 0xc023]),
    ] {
        let reply = first_reply(&addr, &client_hello(version, &suites, false));
        assert!(
            matches!(reply, Some(0x15) | None),
            "{what}: the server went on with the handshake ({reply:?})"
        );
    }
    // Plaintext gRPC (HTTP/2 without TLS) to the TLS port.
    let plain = format!("http://{addr}");
    let channel = tonic::transport::Endpoint::from_shared(plain)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(channel) = channel {
        let mut client =
            nembo_proto::v1::coordinator_service_client::CoordinatorServiceClient::new(channel);
        let mut req = tonic::Request::new(pb::ListJobsRequest::default());
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", c.token()).parse().unwrap(),
        );
        let r = tokio::time::timeout(Duration::from_secs(10), client.list_jobs(req)).await;
        assert!(!matches!(r, Ok(Ok(_))), "a plaintext call was answered");
    }
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let reply = first_reply(&addr, preface);
    assert!(
        matches!(reply, Some(0x15) | None),
        "plaintext HTTP/2 got {reply:?}"
    );
    // And the coordinator still serves over TLS.
    let mut client = c.client().await;
    client
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_renew_their_certificates_before_they_expire_and_jobs_run_on() {
    // 12 s certificates: renewed after 8 s, while a job runs.
    let c = Coordinator::start(&["--agent-cert-ttl-s", "12"]).await;
    let id = c
        .submit("run: for i in $(seq 1 15); do echo tick $i; sleep 1; done")
        .await;
    let job = c
        .wait_state(&id, pb::JobState::Running, Duration::from_secs(30))
        .await;
    let node = job.node_ids[0].clone();
    let meta = c
        .dir
        .path()
        .join("nodes")
        .join(&node)
        .join("identity/node.json");
    let first: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    let renewed = wait_for(
        "the certificate to be renewed",
        Duration::from_secs(20),
        || {
            let meta = meta.clone();
            let first = first.clone();
            async move {
                let now: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&meta).ok()?).ok()?;
                (now["not_after_ms"] != first["not_after_ms"]).then_some(now)
            }
        },
    )
    .await;
    assert!(renewed["not_after_ms"].as_i64() > first["not_after_ms"].as_i64());
    let done = c
        .wait_state(&id, pb::JobState::Succeeded, Duration::from_secs(40))
        .await;
    assert_eq!(
        done.attempts.len(),
        1,
        "the renewal did not disturb the job"
    );
    assert!(c.logs(&id).await.contains("tick 15"));
    let log =
        std::fs::read_to_string(c.dir.path().join("nodes").join(&node).join("agent.log")).unwrap();
    assert!(log.contains("certificate renewed"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_installs_an_existing_ca_that_then_signs_members_and_agents() {
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::OrganizationName, "Acme GPUs");
    p.distinguished_name
        .push(DnType::CommonName, "Acme internal root");
    let ca_pem = p.self_signed(&key).unwrap().pem();
    let (ca, ca_key, wrong_key) = (
        dir.path().join("acme.pem"),
        dir.path().join("acme.key"),
        dir.path().join("other.key"),
    );
    std::fs::write(&ca, &ca_pem).unwrap();
    write_private(&ca_key, &key.serialize_pem());
    write_private(&wrong_key, &KeyPair::generate().unwrap().serialize_pem());
    let cluster = dir.path().join("cluster");
    let init = |key: &Path| {
        Command::new(bin("nembo-coordinator"))
            .args(["init", "--cluster-dir"])
            .arg(&cluster)
            .arg("--ca-cert")
            .arg(&ca)
            .arg("--ca-key")
            .arg(key)
            .output()
            .unwrap()
    };
    let out = init(&wrong_key);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not belong"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = init(&ca_key);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("token"));
    assert_eq!(
        std::fs::read_to_string(cluster.join("tls/ca.pem")).unwrap(),
        ca_pem
    );
    // A coordinator of that cluster serves with a certificate from the
    // imported CA, and its agents enroll with certificates from it too.
    let c = Coordinator::start(&["--cluster-dir", cluster.to_str().unwrap()]).await;
    assert_eq!(c.ca(), ca_pem.as_bytes());
    let id = c.submit("run: echo signed-by-acme").await;
    c.wait_state(&id, pb::JobState::Succeeded, Duration::from_secs(30))
        .await;
    assert!(c.logs(&id).await.contains("signed-by-acme"));
}
