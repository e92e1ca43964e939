//! The cloud providers against their real wire formats: EC2 against
//! moto_server with signature checking on, Seeweb against the fake Seeweb
//! server (tests/fakes/seeweb_fake.py), the SSH pool against a real sshd on
//! loopback, and the local provider's declared prices and capacity. Each
//! runs a real coordinator and the real CLI.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nembo_proto::v1 as pb;
use nembo_tests::{bin, wait_for, Coordinator};
use serde_json::Value;

/// A helper process killed when the test ends, however it ends.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json_out(o: &std::process::Output) -> Value {
    assert!(o.status.success(), "{}{}", stdout(o), stderr(o));
    serde_json::from_str(&stdout(o)).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

/// A coordinator using `providers` as its providers.yaml.
async fn start_with(
    providers: &str,
    env: &[(&str, &str)],
    extra: &[&str],
) -> (Coordinator, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("providers.yaml");
    std::fs::write(&path, providers).unwrap();
    let mut args = vec!["--providers", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    let c = Coordinator::start_with_env(&args, env).await;
    (c, dir)
}

async fn node_of(c: &Coordinator, job: &str) -> pb::Node {
    wait_for(
        "the job's node to be launched",
        Duration::from_secs(60),
        || async {
            let jobs = c.jobs().await;
            let j = jobs.iter().find(|j| j.job_id == job)?;
            let node_id = j.node_ids.first()?.clone();
            c.nodes()
                .await
                .into_iter()
                .find(|n| n.node_id == node_id && !n.instance_id.is_empty())
        },
    )
    .await
}

fn write_task(dir: &Path, name: &str, yaml: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, yaml).unwrap();
    p.to_str().unwrap().to_string()
}

// ---------------------------------------------------------------- EC2 / moto

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_launches_tagged_spot_instances_with_signed_calls_and_terminates_them() {
    // Three unsigned calls to create a user; every later call is checked.
    let moto = nembo_tests::Moto::start(&[("INITIAL_NO_AUTH_ACTION_COUNT", "3")]).await;
    let endpoint = moto.endpoint.clone();
    let creds = nembo_tests::Moto::helper(&["setup", &endpoint]);
    let (key, secret) = (
        creds["key_id"].as_str().unwrap(),
        creds["secret"].as_str().unwrap(),
    );
    let providers = format!(
        "aws:\n  regions: [us-east-1]\n  image_id: {}\n  endpoint: {endpoint}\n",
        creds["image_id"].as_str().unwrap()
    );
    let env = [
        ("AWS_ACCESS_KEY_ID", key),
        ("AWS_SECRET_ACCESS_KEY", secret),
    ];
    let (c, dir) = start_with(&providers, &env, &["--provision-timeout-ms", "600000"]).await;

    let check = json_out(&c.cli(&["check", "--json"]));
    let aws = check["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["provider"] == "aws")
        .expect("aws in check")
        .clone();
    assert_eq!(aws["ok"], true, "{aws}");
    assert!(
        aws["message"]
            .as_str()
            .unwrap()
            .contains("credentials accepted"),
        "{aws}"
    );

    // The cheapest spot L4 in us-east-1, from the shipped catalog.
    let task = write_task(
        dir.path(),
        "l4.yaml",
        "name: l4\nresources: {infra: aws/us-east-1, accelerators: L4:1, use_spot: true}\nrun: nvidia-smi\n",
    );
    let plan = json_out(&c.cli(&["launch", "--dry-run", "--json", &task]));
    assert_eq!(plan["placement"]["provider"], "aws");
    let yaml = std::fs::read_to_string(&task).unwrap();
    let job = c.submit(&yaml).await;
    let node = node_of(&c, &job).await;
    assert!(node.instance_id.starts_with("i-"), "{node:?}");

    let instances = nembo_tests::Moto::helper(&["instances", &endpoint, key, secret]);
    let inst = instances
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == node.instance_id.as_str())
        .unwrap_or_else(|| panic!("{} not in moto: {instances}", node.instance_id))
        .clone();
    assert_eq!(inst["type"], node.instance_type.as_str());
    assert_eq!(inst["type"], plan["placement"]["instance_type"]);
    assert_eq!(inst["lifecycle"], "spot", "{inst}");
    assert_eq!(inst["tags"]["nembo-node"], node.node_id.as_str());
    assert!(inst["tags"]["nembo-cluster"]
        .as_str()
        .is_some_and(|t| t.len() == 16));
    // The zone the catalog priced (a zone ID) became that zone's name.
    assert!(
        inst["zone"].as_str().unwrap().starts_with("us-east-1"),
        "{inst}"
    );
    let user_data = inst["user_data"].as_str().unwrap();
    assert!(
        user_data.contains("systemctl enable nembo-agent.service"),
        "{user_data}"
    );
    assert!(user_data.contains(&format!("--node-id {}", node.node_id)));
    assert!(
        !user_data.contains(&c.agent_token()),
        "the cluster's agent token is in user data"
    );

    // Cancelling lets the node go: the instance is terminated for real.
    let out = c.cli(&["cancel", &job]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = c.cli(&["down", &node.node_id]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for(
        "the instance to be terminated",
        Duration::from_secs(30),
        || async {
            let all = nembo_tests::Moto::helper(&["instances", &endpoint, key, secret]);
            all.as_array()
                .unwrap()
                .iter()
                .find(|i| i["id"] == node.instance_id.as_str())
                .filter(|i| i["state"] == "terminated" || i["state"] == "shutting-down")
                .cloned()
        },
    )
    .await;

    // A wrong secret is refused by moto's signature check, and check says so.
    let bad = [
        ("AWS_ACCESS_KEY_ID", key),
        ("AWS_SECRET_ACCESS_KEY", "wrong"),
    ];
    let (c2, _d2) = start_with(&providers, &bad, &[]).await;
    let out = c2.cli(&["check", "--json"]);
    let check: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let aws = check["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["provider"] == "aws")
        .unwrap()
        .clone();
    assert_eq!(aws["ok"], false, "{aws}");
    assert!(
        aws["message"].as_str().unwrap().contains("not authorized"),
        "{aws}"
    );
}

/// `nembo stop` on AWS is StopInstances (the EBS disk stays), `nembo start`
/// StartInstances, and the agent comes back with its identity; a spot
/// cluster is refused, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_stop_and_start_a_cluster_and_refuse_to_stop_spot() {
    let moto = nembo_tests::Moto::start(&[("INITIAL_NO_AUTH_ACTION_COUNT", "3")]).await;
    let endpoint = moto.endpoint.clone();
    let creds = nembo_tests::Moto::helper(&["setup", &endpoint]);
    let (key, secret) = (
        creds["key_id"].as_str().unwrap(),
        creds["secret"].as_str().unwrap(),
    );
    let providers = format!(
        "bootstrap:\n  agent_url: file://{}\naws:\n  regions: [us-east-1]\n  image_id: {}\n  endpoint: {endpoint}\n",
        bin("nembo-agent").display(),
        creds["image_id"].as_str().unwrap()
    );
    let env = [
        ("AWS_ACCESS_KEY_ID", key),
        ("AWS_SECRET_ACCESS_KEY", secret),
    ];
    let (c, dir) = start_with(&providers, &env, &["--provision-timeout-ms", "600000"]).await;
    let task = write_task(
        dir.path(),
        "gpu.yaml",
        "resources: {infra: aws/us-east-1, accelerators: L4:1}\nrun: echo on $SKYPILOT_NODE_RANK\n",
    );
    let out = c.cli(&["launch", "-c", "gpu", "-d", &task]);
    assert!(out.status.success(), "{}", stderr(&out));
    let job = stdout(&out).trim().to_string();
    let node = node_of(&c, &job).await;
    let state_of = |id: &str| {
        let all = nembo_tests::Moto::helper(&["instances", &endpoint, key, secret]);
        let i = all
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == id)
            .cloned()
            .unwrap_or_default();
        (i["state"].as_str().unwrap_or_default().to_string(), i)
    };
    let (_, inst) = state_of(&node.instance_id);
    let vm = tempfile::tempdir().unwrap();
    let (agent, _) = boot_vm(inst["user_data"].as_str().unwrap(), vm.path());
    c.wait_state(&job, pb::JobState::Succeeded, Duration::from_secs(60))
        .await;

    let out = c.cli(&["stop", "gpu", "-y"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(state_of(&node.instance_id).0, "stopped");
    drop(agent); // the VM halts

    let mut client = c.client().await;
    client
        .start_cluster(pb::StartClusterRequest { name: "gpu".into() })
        .await
        .unwrap();
    wait_for("StartInstances", Duration::from_secs(30), || async {
        (state_of(&node.instance_id).0 == "running").then_some(())
    })
    .await;
    let _agent = start_unit(vm.path()); // it boots: systemd starts the agent
    let out = c.cli(&["exec", "gpu", "echo back on $SKYPILOT_NODE_RANK"]);
    assert!(
        out.status.success() && stdout(&out).contains("back on 0"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let n = c.nodes().await;
    assert_eq!(n.len(), 1, "the same VM: {n:?}");

    // Spot cannot be stopped on AWS: refused, pointing at down.
    let spot = write_task(
        dir.path(),
        "spot.yaml",
        "resources: {infra: aws/us-east-1, accelerators: L4:1, use_spot: true}\nrun: 'true'\n",
    );
    let out = c.cli(&["launch", "-c", "cheap", "-d", &spot]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = c.cli(&["stop", "cheap", "-y"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("spot") && stderr(&out).contains("nembo down cheap"),
        "{}",
        stderr(&out)
    );
}

// ---------------------------------------------------------- Seeweb / fake

struct FakeSeeweb {
    _proc: Daemon,
    base: String,
}

impl FakeSeeweb {
    fn start(token: &str, args: &[&str]) -> FakeSeeweb {
        let mut child = Command::new("python3")
            .arg(repo().join("tests/fakes/seeweb_fake.py"))
            .args(["--port", "0", "--token", token])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("LISTENING ")
            .unwrap_or_else(|| panic!("fake Seeweb said {line:?}"))
            .to_string();
        FakeSeeweb {
            _proc: Daemon(child),
            base,
        }
    }

    fn get(&self, path: &str) -> Value {
        let url = format!("{}{path}", self.base.trim_end_matches("/ecs/v2"));
        let (_, body) = nembo_tests::http_get(&url).unwrap_or_else(|| panic!("GET {url}"));
        serde_json::from_str(&body).unwrap()
    }
}

/// Plays the VM: runs the first-boot script the fake received, with
/// `systemctl` recorded, then "reboots" by starting the unit's ExecStart as
/// systemd would. Returns the agent process and what systemctl was asked.
fn boot_vm(script: &str, root: &Path) -> (Daemon, String) {
    let bin_dir = root.join("stub-bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let calls = root.join("systemctl.calls");
    let stub = bin_dir.join("systemctl");
    std::fs::write(
        &stub,
        format!("#!/bin/sh\necho \"$@\" >> {}\n", calls.display()),
    )
    .unwrap();
    std::fs::set_permissions(&stub, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let vm = root.join("vm");
    let out = Command::new("bash")
        .arg("-c")
        .arg(script)
        .env("NEMBO_ROOT", &vm)
        .env(
            "PATH",
            format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap()),
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "first-boot script: {}", stderr(&out));
    (
        start_unit(root),
        std::fs::read_to_string(calls).unwrap_or_default(),
    )
}

/// Starts the agent as the VM's systemd unit does (at first boot, or when a
/// stopped VM boots again).
fn start_unit(root: &Path) -> Daemon {
    let unit =
        std::fs::read_to_string(root.join("vm/etc/systemd/system/nembo-agent.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let mut words = exec.split_whitespace();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("agent.log"))
        .unwrap();
    let agent = Command::new(words.next().unwrap())
        .args(words)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Daemon(agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeweb_creates_boots_through_the_reboot_and_the_bootstrapped_agent_runs_the_job() {
    let fake = FakeSeeweb::start(
        "sw-token",
        &[
            "--action-polls",
            "2",
            "--boot-polls",
            "2",
            "--not-found-polls",
            "1",
            "--reboot",
        ],
    );
    let providers = format!(
        "bootstrap:\n  agent_url: file://{}\nseeweb:\n  endpoint: {}\n  poll_ms: 100\n  boot_timeout_s: 60\n",
        bin("nembo-agent").display(),
        fake.base
    );
    let (c, dir) = start_with(&providers, &[("SEEWEB_API_TOKEN", "sw-token")], &[]).await;

    // The showcase lands on Seeweb's one-H200 plan at the catalog price.
    let example = repo().join("examples/ollama-rag-seeweb.yaml");
    let plan = json_out(&c.cli(&["launch", "--dry-run", "--json", example.to_str().unwrap()]));
    assert_eq!(plan["placement"]["provider"], "seeweb", "{plan}");
    assert_eq!(plan["placement"]["instance_type"], "ECS1GPU10");
    assert_eq!(plan["placement"]["region"], "it-fr2");
    assert_eq!(plan["placement"]["hourly_price"], 2.6);

    // The catalog refreshed from the fake's GET /plans has its plans, normalised.
    let csv = dir.path().join("seeweb.csv");
    let out = c.cli(&[
        "catalog",
        "refresh",
        "seeweb",
        "--out",
        csv.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&csv).unwrap();
    assert!(
        text.contains("ECS1GPU10,H200,1,24,240,2.6,,it-fr2,"),
        "{text}"
    );
    assert!(text.contains("ECS4GPU7,L40S,8,"), "{text}");
    assert!(
        !text.contains("ECS1,"),
        "CPU plans are not GPU offerings: {text}"
    );

    let task = write_task(
        dir.path(),
        "sw.yaml",
        "name: sw\nresources: {infra: seeweb, accelerators: H100:1}\nrun: echo hello from the seeweb vm\n",
    );
    let out = c.cli(&["launch", "-c", "sw", "-d", &task]);
    assert!(out.status.success(), "{}", stderr(&out));
    let job = stdout(&out).trim().to_string();
    let node = node_of(&c, &job).await;
    let server = fake.get(&format!("/_fake/servers/{}", node.instance_id));
    let server = &server["server"];
    assert_eq!(server["plan"], "ECS1GPU8");
    assert_eq!(server["image"], "ubuntu-2204-nvidia-driver");
    assert!(server["notes"]
        .as_str()
        .unwrap()
        .ends_with(&format!(":{}", node.node_id)));
    // The provider polled the create action and the boot, through the reboot.
    let log = fake.get("/_fake/log");
    let paths: Vec<String> = log["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["method"].as_str().unwrap(),
                e["path"].as_str().unwrap()
            )
        })
        .collect();
    assert!(
        paths.iter().any(|p| p.starts_with("GET /ecs/v2/actions/")),
        "{paths:?}"
    );
    assert!(
        paths.iter().any(|p| p == "GET /ecs/v2/plans/availables"),
        "{paths:?}"
    );
    assert!(log["requests"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["had_valid_token"] == true));

    let script = server["user_customize"].as_str().unwrap();
    let vm = tempfile::tempdir().unwrap();
    let (agent, calls) = boot_vm(script, vm.path());
    assert!(calls.contains("enable nembo-agent.service"), "{calls}");
    assert!(
        !calls.contains("start nembo-agent"),
        "Seeweb reboots after first boot: the unit must wait for it ({calls})"
    );
    let done = c
        .wait_state(&job, pb::JobState::Succeeded, Duration::from_secs(60))
        .await;
    assert_eq!(done.node_ids, vec![node.node_id.clone()]);
    assert!(c.logs(&job).await.contains("hello from the seeweb vm"));

    // stop powers the server off (it and its disk stay); start powers it
    // on, and the agent its unit starts at boot comes back.
    let power = || {
        fake.get(&format!("/_fake/servers/{}", node.instance_id))["server"]["current_status"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let out = c.cli(&["stop", "sw", "-y"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(power(), "SHUTOFF");
    drop(agent);
    let mut client = c.client().await;
    client
        .start_cluster(pb::StartClusterRequest { name: "sw".into() })
        .await
        .unwrap();
    wait_for("power_on", Duration::from_secs(30), || async {
        (power() == "RUNNING").then_some(())
    })
    .await;
    let _agent = start_unit(vm.path());
    let out = c.cli(&["exec", "sw", "echo back on the seeweb vm"]);
    assert!(
        out.status.success() && stdout(&out).contains("back on the seeweb vm"),
        "{}",
        stderr(&out)
    );

    // down deletes the server at Seeweb.
    let out = c.cli(&["down", "sw", "-y"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for(
        "the server to be deleted",
        Duration::from_secs(30),
        || async {
            let s = fake.get(&format!("/_fake/servers/{}", node.instance_id));
            (s["server"]["status"] == "Deleted" || s["server"]["status"] == "Deleting")
                .then_some(())
        },
    )
    .await;
}

/// `disk_size` and `disk_tier` size and type the root volume
/// (BlockDeviceMappings, as SkyPilot maps the tiers); `ports` get a
/// security group of the node's own, deleted once the node is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_gives_the_disk_and_ports_asked_for() {
    let moto = nembo_tests::Moto::start(&[("INITIAL_NO_AUTH_ACTION_COUNT", "3")]).await;
    let endpoint = moto.endpoint.clone();
    let creds = nembo_tests::Moto::helper(&["setup", &endpoint]);
    let (key, secret) = (
        creds["key_id"].as_str().unwrap(),
        creds["secret"].as_str().unwrap(),
    );
    let providers = format!(
        "aws:\n  regions: [us-east-1]\n  image_id: {}\n  endpoint: {endpoint}\n",
        creds["image_id"].as_str().unwrap()
    );
    let env = [
        ("AWS_ACCESS_KEY_ID", key),
        ("AWS_SECRET_ACCESS_KEY", secret),
    ];
    let (c, dir) = start_with(&providers, &env, &["--provision-timeout-ms", "600000"]).await;
    // The task's own AMI for this region, not the configured default.
    let ami = creds["other_image_id"].as_str().unwrap();
    let task = write_task(
        dir.path(),
        "disk.yaml",
        &format!("resources: {{infra: aws/us-east-1, accelerators: L4:1, disk_size: 512, disk_tier: high, image_id: {{us-east-1: {ami}}}}}\nrun: df -h /\n"),
    );
    let plan = json_out(&c.cli(&["launch", "--dry-run", "--json", &task]));
    assert_eq!(
        plan["task"]["resources"]["any_of"][0]["disk_size"], "512",
        "{plan}"
    );
    let job = c.submit(&std::fs::read_to_string(&task).unwrap()).await;
    let node = node_of(&c, &job).await;
    let instances = nembo_tests::Moto::helper(&["instances", &endpoint, key, secret]);
    let inst = instances
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == node.instance_id.as_str())
        .unwrap_or_else(|| panic!("{instances}"))
        .clone();
    assert_eq!(inst["image"], ami, "{inst}");
    let root = inst["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["size"] == 512)
        .unwrap_or_else(|| panic!("no 512 GB volume: {inst}"))
        .clone();
    // moto keeps the size and type; it gives gp3 its default IOPS whatever
    // is asked (the parameters are checked in aws.rs's unit tests).
    assert_eq!(root["type"], "gp3", "{root}");

    // A notebook's port: the node's own group opens it to the world, beside
    // the VPC's default group (its peers, egress).
    let notebook = c
        .submit("resources: {infra: aws/us-east-1, accelerators: L4:1, ports: [8888, 6006-6007]}\nrun: jupyter lab\n")
        .await;
    let node = node_of(&c, &notebook).await;
    let instances = nembo_tests::Moto::helper(&["instances", &endpoint, key, secret]);
    let inst = instances
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == node.instance_id.as_str())
        .unwrap_or_else(|| panic!("{instances}"))
        .clone();
    let groups = nembo_tests::Moto::helper(&["groups", &endpoint, key, secret]);
    let attached: Vec<&Value> = groups
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| inst["groups"].as_array().unwrap().contains(&g["id"]))
        .collect();
    assert!(
        attached.iter().any(|g| g["name"] == "default"),
        "{inst} {groups}"
    );
    let own = attached
        .iter()
        .find(|g| g["tags"]["nembo-node"] == node.node_id.as_str())
        .unwrap_or_else(|| panic!("no group of the node's own: {groups}"));
    let mut rules = own["ingress"].as_array().unwrap().clone();
    rules.sort_by_key(|r| r[0].as_u64());
    assert_eq!(
        Value::Array(rules),
        serde_json::json!([[6006, 6007, "0.0.0.0/0"], [8888, 8888, "0.0.0.0/0"]])
    );
    // Another job's port is not open on that node: it is not reused for it.
    let plan = json_out(&c.cli(&[
        "launch",
        "--dry-run",
        "--json",
        &write_task(
            dir.path(),
            "other.yaml",
            "resources: {infra: aws/us-east-1, accelerators: L4:1, ports: 9000}\nrun: 'true'\n",
        ),
    ]));
    let reused = plan["placement"]["existing_node_ids"].as_array().unwrap();
    assert!(
        !reused.contains(&Value::from(node.node_id.as_str())),
        "{plan}"
    );
    // Gone with the node.
    let own_id = own["id"].clone();
    c.cli(&["cancel", &notebook]);
    let out = c.cli(&["down", &node.node_id]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("the port group to go", Duration::from_secs(60), || async {
        let groups = nembo_tests::Moto::helper(&["groups", &endpoint, key, secret]);
        (!groups.as_array().unwrap().iter().any(|g| g["id"] == own_id)).then_some(())
    })
    .await;
}

/// The shipped SkyPilot-format examples dry-run on AWS (moto) to the
/// instance their accelerators need, with their node count, disk and ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_dry_run_on_aws_to_the_right_instances() {
    let moto = nembo_tests::Moto::start(&[("INITIAL_NO_AUTH_ACTION_COUNT", "3")]).await;
    let endpoint = moto.endpoint.clone();
    let creds = nembo_tests::Moto::helper(&["setup", &endpoint]);
    let providers = format!(
        "aws:\n  regions: [us-east-1]\n  image_id: {}\n  endpoint: {endpoint}\n",
        creds["image_id"].as_str().unwrap()
    );
    let env = [
        ("AWS_ACCESS_KEY_ID", creds["key_id"].as_str().unwrap()),
        ("AWS_SECRET_ACCESS_KEY", creds["secret"].as_str().unwrap()),
    ];
    let (c, _dir) = start_with(&providers, &env, &[]).await;
    let examples = repo().join("examples");
    // (example, extra flags, instance type's family, nodes)
    let cases: [(&str, &[&str], &str, u64); 6] = [
        ("docker-image.yaml", &[], "g6.", 1),
        ("gpu-train.yaml", &[], "p5.", 2),
        ("storage-mount.yaml", &[], "g6.", 1),
        ("any-gpu.yaml", &[], "g", 1),
        // H100:1 is a Seeweb plan; AWS sells H100s eight at a time (the
        // catalog snapshot has no p5.4xlarge), as SkyPilot would say.
        (
            "finetune-s3-dataset.yaml",
            &[
                "--gpus",
                "H100:8",
                "--secret",
                "AWS_ACCESS_KEY_ID=x",
                "--secret",
                "AWS_SECRET_ACCESS_KEY=y",
            ],
            "p5.",
            1,
        ),
        // The notebook asks for no GPU; the shipped AWS catalog is GPU
        // instances only, so it is given one.
        (
            "jupyter-notebook.yaml",
            &["--gpus", "L4:1", "--secret", "JUPYTER_TOKEN=t"],
            "g6.",
            1,
        ),
    ];
    for (name, extra, family, nodes) in cases {
        let path = examples.join(name);
        let mut args = vec![
            "launch",
            "--dry-run",
            "--json",
            path.to_str().unwrap(),
            "--infra",
            "aws",
        ];
        args.extend_from_slice(extra);
        let out = c.cli(&args);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let plan = json_out(&out);
        let p = &plan["placement"];
        assert_eq!(p["provider"], "aws", "{name}: {plan}");
        assert!(
            p["instance_type"].as_str().unwrap().starts_with(family),
            "{name}: {plan}"
        );
        assert_eq!(p["new_nodes"], nodes, "{name}: {plan}");
        let task = &plan["task"]["resources"]["any_of"][0];
        if name == "jupyter-notebook.yaml" {
            assert_eq!(
                (task["ports"].as_str(), task["disk_size"].as_str()),
                (Some("8888"), Some("64")),
                "{plan}"
            );
        }
        if name == "docker-image.yaml" {
            assert!(
                task["image_id"].as_str().unwrap().starts_with("docker:"),
                "{plan}"
            );
        }
    }
}

// ------------------------------------------------------------ SSH / sshd

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_pool_copies_the_agent_runs_a_job_and_down_stops_it() {
    let sshd = nembo_tests::LoopbackSshd::start().await;
    let (p, port, user) = (sshd.dir.path(), sshd.port, sshd.user.clone());
    let remote = p.join("remote");
    let providers = format!(
        "ssh:\n  known_hosts: {dir}/known_hosts\n  remote_dir: {remote}\n  hosts:\n    - name: box1\n      host: 127.0.0.1\n      port: {port}\n      user: {user}\n      identity_file: {dir}/id\n      region: lab\n      accelerators: H100:2\n      cpus: 8\n      memory_gb: 32\n      hourly_price: 1.5\n",
        dir = p.display(),
        remote = remote.display(),
        user = user.trim(),
    );
    let (c, _pd) = start_with(&providers, &[], &[]).await;
    let check = json_out(&c.cli(&["check", "--json"]));
    let ssh = check["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["provider"] == "ssh")
        .unwrap()
        .clone();
    assert_eq!(
        ssh["ok"],
        true,
        "{ssh} (sshd log: {})",
        std::fs::read_to_string(p.join("sshd.log")).unwrap_or_default()
    );

    let job = c
        .submit("name: onbox\nresources: {infra: ssh/lab, accelerators: H100:2}\nrun: echo ran over ssh with $SKYPILOT_NUM_GPUS_PER_NODE gpus\n")
        .await;
    let done = c
        .wait_state(&job, pb::JobState::Succeeded, Duration::from_secs(60))
        .await;
    // The agent may enroll before the launch call has answered.
    let node = wait_for("the instance id", Duration::from_secs(30), || async {
        c.nodes()
            .await
            .into_iter()
            .find(|n| Some(&n.node_id) == done.node_ids.first() && !n.instance_id.is_empty())
    })
    .await;
    assert_eq!(node.provider, "ssh");
    assert!(node.instance_id.starts_with("box1:"), "{node:?}");
    assert!(c.logs(&job).await.contains("ran over ssh with 2 gpus"));
    // The agent binary and the node's private files are on the host.
    assert!(remote.join("nembo-agent").is_file());
    // It traded its one-time join token for a certificate: the token is
    // gone, the key is private.
    let node_dir = remote.join("nodes").join(&node.node_id);
    assert!(!node_dir.join("join-token").exists());
    let mode = std::fs::metadata(node_dir.join("identity/node.key"))
        .unwrap()
        .permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o077, 0);
    let pid: i32 = node.instance_id.split_once(':').unwrap().1.parse().unwrap();
    assert!(nembo_tests::alive(pid));

    let out = c.cli(&["down", &node.node_id]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("the agent to stop", Duration::from_secs(30), || async {
        (!nembo_tests::alive(pid)).then_some(())
    })
    .await;
}

// ------------------------------------------------- local prices, capacity

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_declared_prices_rank_regions_and_a_full_region_fails_over() {
    let providers = "local:\n  simulate: true\n  gpu_hourly: {H100: 2.0}\n  regions:\n    us-east: {capacity: 0}\n    eu-west: {price_factor: 1.5}\n";
    let (c, dir) = start_with(providers, &[], &[]).await;
    let task = write_task(
        dir.path(),
        "h100.yaml",
        "name: priced\nresources: {infra: local, accelerators: H100:1}\nrun: echo priced run\n",
    );
    let plan = json_out(&c.cli(&["launch", "--dry-run", "--json", &task]));
    assert_eq!(plan["placement"]["region"], "us-east");
    assert_eq!(plan["placement"]["hourly_price"], 2.0);
    let out = c.cli(&["launch", &task]);
    let progress = stderr(&out);
    assert!(out.status.success(), "{progress}");
    assert!(
        progress.contains("local/us-east") && progress.contains("full"),
        "{progress}"
    );
    assert!(stdout(&out).contains("priced run"), "{}", stdout(&out));
    let nodes = c.nodes().await;
    assert!(
        nodes
            .iter()
            .any(|n| n.region == "eu-west" && n.hourly_price == 3.0),
        "{nodes:?}"
    );

    // A bad providers.yaml stops the coordinator with the field named.
    let bad = tempfile::tempdir().unwrap();
    let path = bad.path().join("providers.yaml");
    std::fs::write(&path, "local:\n  regions:\n    mars: {capacity: 1}\n").unwrap();
    let out = Command::new(bin("nembo-coordinator"))
        .arg("--data-dir")
        .arg(bad.path().join("data"))
        .arg("--providers")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("local.regions.mars"),
        "{}",
        stderr(&out)
    );
}
