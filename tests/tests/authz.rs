//! Users, roles and the audit trail (issue 7), as an attacker would try
//! them: no token, a wrong one, a revoked one, a viewer's token trying to
//! submit, a user reaching for another user's jobs, and a follower asked to
//! do what its caller may not.

use std::time::Duration;

use nembo_proto::v1 as pb;
use nembo_tests::{Cluster, Coordinator};
use prost::Message as _;
use tonic::transport::Channel;
use tonic::Code;

/// Every method of `nembo.v1.CoordinatorService`, as the served descriptor has it:
/// a method added later is covered without touching this test.
fn coordinator_methods() -> Vec<(String, bool)> {
    let set = prost_types::FileDescriptorSet::decode(nembo_proto::FILE_DESCRIPTOR_SET)
        .expect("descriptor set");
    let service = set
        .file
        .iter()
        .flat_map(|f| &f.service)
        .find(|s| s.name() == "CoordinatorService")
        .expect("CoordinatorService");
    service
        .method
        .iter()
        .map(|m| (m.name().to_string(), m.server_streaming()))
        .collect()
}

/// Calls `method` with an empty request (every field at its default) as
/// the holder of `token`, and returns the status code it ends with.
async fn call(channel: &Channel, token: &str, method: &str, streaming: bool) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("ready");
    let path: http::uri::PathAndQuery = format!("/nembo.v1.CoordinatorService/{method}")
        .parse()
        .unwrap();
    let mut req = tonic::Request::new(());
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let result = if streaming {
        grpc.server_streaming(req, path, codec).await.map(|_| ())
    } else {
        grpc.unary(req, path, codec).await.map(|_| ())
    };
    match result {
        Ok(()) => Code::Ok,
        Err(s) => s.code(),
    }
}

fn role_needed(method: &str) -> u8 {
    // The table this test holds the coordinator to, written out again
    // here on purpose: 0 viewer, 1 user, 2 admin.
    match method {
        "GetJob" | "ListJobs" | "ListNodes" | "GetClusterStatus" | "GetFleetMetrics"
        | "WatchFleetMetrics" | "GetGpuHistory" | "ListOfferings" | "GetCostReport" | "WhoAmI"
        | "ListClusters" | "ListServices" => 0,
        "SubmitJob" | "DryRun" | "CancelJob" | "StreamLogs" | "CheckProviders"
        | "FindMissingBlobs" | "PutBlobs" | "StopCluster" | "StartCluster" | "DownCluster"
        | "SetAutostop" | "Shell" | "ServeUp" | "ServeUpdate" | "ServeDown" => 1,
        _ => 2,
    }
}

/// `nembo admin users create NAME --role ROLE`, returning the token it
/// printed (stdout holds the token alone).
fn create_user(c: &Coordinator, name: &str, role: &str) -> String {
    let out = c.cli(&["admin", "users", "create", name, "--role", role]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(token.starts_with("nembo_"), "{token}");
    token
}

fn submit_req(run: &str) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        task: Some(pb::submit_job_request::Task::TaskYaml(format!(
            "run: {run}"
        ))),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_checks_the_callers_role_and_refuses_bad_tokens() {
    let c = Coordinator::start(&[]).await;
    let viewer = create_user(&c, "vera", "viewer");
    let user = create_user(&c, "alice", "user");
    let admin = create_user(&c, "ada", "admin");
    let revoked = create_user(&c, "mallory", "admin");
    let out = c.cli(&["admin", "users", "revoke", "mallory"]);
    assert!(out.status.success());
    let channel = nembo_proto::client::endpoint(&c.endpoint(), &c.ca())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let methods = coordinator_methods();
    assert!(methods.len() >= 29, "{methods:?}");
    let mut checked = 0;
    for (method, streaming) in &methods {
        for bad in [
            String::new(),
            "wrong".to_string(),
            c.agent_token(),
            revoked.clone(),
            format!("{}x", &user[..user.len() - 1]),
        ] {
            assert_eq!(
                call(&channel, &bad, method, *streaming).await,
                Code::Unauthenticated,
                "{method} with token {bad:?}"
            );
        }
        for (rank, token) in [&viewer, &user, &admin].into_iter().enumerate() {
            let code = call(&channel, token, method, *streaming).await;
            if (rank as u8) < role_needed(method) {
                assert_eq!(code, Code::PermissionDenied, "{method} as role {rank}");
            } else {
                assert!(
                    !matches!(code, Code::PermissionDenied | Code::Unauthenticated),
                    "{method} as role {rank}: {code:?}"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, methods.len() * 3);
    // The viewer's refused submission is in the audit trail, by name.
    let audit = c.cli(&["admin", "audit", "--limit", "10000", "--json"]);
    let records: serde_json::Value = serde_json::from_slice(&audit.stdout).unwrap();
    let refused = records
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["who"] == "vera" && r["call"] == "SubmitJob")
        .expect("the viewer's submission is recorded");
    assert_eq!(refused["result"], "PermissionDenied");
    assert_eq!(refused["role"], "viewer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_see_and_cancel_only_their_own_jobs_and_every_change_is_audited() {
    let c = Coordinator::start(&["--sim-provider"]).await;
    let alice = create_user(&c, "alice", "user");
    let bob = create_user(&c, "bob", "user");
    let vera = create_user(&c, "vera", "viewer");
    let (mut a, mut b, mut v) = (
        c.client_with_token(&alice).await,
        c.client_with_token(&bob).await,
        c.client_with_token(&vera).await,
    );
    let job = a
        .submit_job(submit_req("sleep 30"))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let bobs = b
        .submit_job(submit_req("sleep 30"))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let got = a
        .get_job(pb::GetJobRequest {
            job_id: job.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(got.owner, "alice");
    // Bob sees only his own job, and cannot read, follow or cancel Alice's.
    let listed: Vec<String> = b
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs
        .into_iter()
        .map(|j| j.job_id)
        .collect();
    assert_eq!(listed, vec![bobs.clone()]);
    let get = b.get_job(pb::GetJobRequest {
        job_id: job.clone(),
    });
    assert_eq!(get.await.unwrap_err().code(), Code::PermissionDenied);
    let logs = b.stream_logs(pb::StreamLogsRequest {
        job_id: job.clone(),
        follow: false,
    });
    assert_eq!(logs.await.unwrap_err().code(), Code::PermissionDenied);
    let cancel = b.cancel_job(pb::CancelJobRequest {
        job_id: job.clone(),
    });
    assert_eq!(cancel.await.unwrap_err().code(), Code::PermissionDenied);
    // The viewer reads every job's status, and changes nothing.
    let all = v
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(all.len(), 2);
    assert!(
        all.iter().all(|j| j.spec.is_none() && j.state != 0),
        "a viewer reads status, not what others run"
    );
    let cancel = v.cancel_job(pb::CancelJobRequest {
        job_id: job.clone(),
    });
    assert_eq!(cancel.await.unwrap_err().code(), Code::PermissionDenied);
    // Alice cancels her own; the admin (the cluster's token) cancels Bob's.
    a.cancel_job(pb::CancelJobRequest {
        job_id: job.clone(),
    })
    .await
    .unwrap();
    let mut root = c.client().await;
    root.cancel_job(pb::CancelJobRequest {
        job_id: bobs.clone(),
    })
    .await
    .unwrap();
    // The CLI takes a user's token from NEMBO_TOKEN_FILE.
    let token_file = c.dir.path().join("alice.token");
    nembo_tests::write_private(&token_file, &alice);
    let who = std::process::Command::new(nembo_tests::bin("nembo"))
        .arg("whoami")
        .env("NEMBO_API_INFO", c.dir.path().join("api.json"))
        .env("NEMBO_TOKEN_FILE", &token_file)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&who.stdout).trim(), "alice (user)");
    // Revoked: Alice's token opens nothing any more.
    assert!(c
        .cli(&["admin", "users", "revoke", "alice"])
        .status
        .success());
    let err = a
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // Who did what, when, with what result.
    let out = c.cli(&["admin", "audit", "--json"]);
    assert!(out.status.success());
    let records: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let seen = |who: &str, call: &str, target: &str, result: &str| {
        records.iter().any(|r| {
            r["who"] == who
                && r["call"] == call
                && r["target"].as_str().unwrap_or_default() == target
                && r["result"] == result
                && r["at_unix_ms"].as_i64().unwrap_or(0) > 0
        })
    };
    assert!(
        seen("root", "CreateUser", "user alice (user)", "ok"),
        "{records:#?}"
    );
    assert!(
        seen("alice", "SubmitJob", &format!("job {job}"), "ok"),
        "{records:#?}"
    );
    assert!(
        seen("bob", "CancelJob", "", "PermissionDenied"),
        "{records:#?}"
    );
    assert!(
        seen("alice", "CancelJob", &format!("job {job}"), "ok"),
        "{records:#?}"
    );
    assert!(
        seen("root", "CancelJob", &format!("job {bobs}"), "ok"),
        "{records:#?}"
    );
    assert!(
        seen("root", "RevokeUser", "user alice", "ok"),
        "{records:#?}"
    );
    // Reads are not audited; tokens never are.
    assert!(!records.iter().any(|r| r["call"] == "ListJobs"));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&alice[10..]));
    // Users are stored by digest: no token is in the state on disk.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for token in [&alice, &bob, &vera] {
        let secret = token.rsplit('_').next().unwrap();
        let found: Vec<String> = nembo_tests::files_holding(c.dir.path(), secret.as_bytes())
            .into_iter()
            .filter(|p| !p.ends_with("alice.token"))
            .collect();
        assert!(found.is_empty(), "a token's secret is stored in {found:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_forwards_the_callers_own_identity_not_its_own() {
    let cluster = Cluster::start(3, &["--sim-provider"]).await;
    let leader = cluster.leader().await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let mut root = cluster.member_client(leader).await.unwrap();
    let mk = |name: &str, role: pb::Role| pb::CreateUserRequest {
        name: name.into(),
        role: role as i32,
    };
    let alice = root
        .create_user(mk("alice", pb::Role::User))
        .await
        .unwrap()
        .into_inner()
        .token;
    let vera = root
        .create_user(mk("vera", pb::Role::Viewer))
        .await
        .unwrap()
        .into_inner()
        .token;
    let url = &cluster.urls[follower as usize - 1];
    // Give the follower a moment to apply the new users.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut as_alice = nembo_proto::client::connect(url, &cluster.ca(), &alice)
        .await
        .unwrap();
    let id = as_alice
        .submit_job(submit_req("echo hi"))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let job = root
        .get_job(pb::GetJobRequest { job_id: id })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(
        job.owner, "alice",
        "the job must belong to its caller, not to the follower"
    );
    let mut as_vera = nembo_proto::client::connect(url, &cluster.ca(), &vera)
        .await
        .unwrap();
    let err = as_vera.submit_job(submit_req("echo no")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Refused by way of a follower, and still in the leader's audit trail.
    let audit = root
        .get_audit_log(pb::GetAuditLogRequest {
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert!(
        audit
            .iter()
            .any(|r| r.who == "vera" && r.call == "SubmitJob" && r.result == "PermissionDenied"),
        "{audit:?}"
    );
    assert!(audit
        .iter()
        .any(|r| r.who == "alice" && r.call == "SubmitJob" && r.result == "ok"));
    let err = as_alice
        .create_user(mk("eve", pb::Role::Admin))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "a user cannot make an admin through a follower"
    );
}
