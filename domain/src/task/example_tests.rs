use super::*;

#[test]
fn shipped_examples_parse() {
    let none = BTreeMap::new();
    let hello = parse_task_yaml(include_str!("../../../examples/hello.yaml"), &none).unwrap();
    assert_eq!(hello.name.as_deref(), Some("hello"));
    let train = parse_task_yaml(include_str!("../../../examples/gpu-train.yaml"), &none).unwrap();
    assert_eq!(train.num_nodes, 2);
    assert_eq!(train.gpus_per_node(0), 8);
    let any = parse_task_yaml(include_str!("../../../examples/any-gpu.yaml"), &none).unwrap();
    let dev = parse_task_yaml(include_str!("../../../examples/dev-cluster.yaml"), &none).unwrap();
    let autostop = dev.autostop.and_then(|a| a.enabled()).unwrap();
    assert_eq!((autostop.idle_s, autostop.down), (30 * 60, false));
    assert_eq!(any.resources.candidates.len(), 3);
    let mounts =
        parse_task_yaml(include_str!("../../../examples/file-mounts.yaml"), &none).unwrap();
    assert_eq!(mounts.file_mounts.len(), 2);
    let mut keys = BTreeMap::new();
    for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        keys.insert(k.to_string(), "x".to_string());
    }
    let ft = parse_task_yaml(
        include_str!("../../../examples/finetune-s3-dataset.yaml"),
        &keys,
    )
    .unwrap();
    assert_eq!(
        ft.file_mounts["/data/train"],
        MountSource::Uri("s3://my-datasets/alpaca/train".into())
    );
    let mut token = BTreeMap::new();
    token.insert("JUPYTER_TOKEN".to_string(), "t".to_string());
    let nb = parse_task_yaml(
        include_str!("../../../examples/jupyter-notebook.yaml"),
        &token,
    )
    .unwrap();
    assert_eq!(nb.resources.candidates[0].ports[0].start, 8888);
    let docker =
        parse_task_yaml(include_str!("../../../examples/docker-image.yaml"), &none).unwrap();
    assert_eq!(
        docker.container_image(0, &docker.envs).as_deref(),
        Some("pytorch/pytorch:2.3.1-cuda12.1-cudnn8-runtime")
    );
    let storage =
        parse_task_yaml(include_str!("../../../examples/storage-mount.yaml"), &none).unwrap();
    let MountSource::Storage(ckpt) = &storage.file_mounts["/checkpoints"] else {
        panic!("{:?}", storage.file_mounts)
    };
    assert!(ckpt.create && ckpt.mode == StorageMode::Mount);
    let chat = parse_task_yaml(include_str!("../../../examples/serve-local.yaml"), &none).unwrap();
    let svc = chat.service.as_ref().expect("a service");
    assert_eq!(
        (svc.port, svc.readiness_probe.path.as_str()),
        (8080, "/health")
    );
    assert_eq!(svc.replica_policy.target_qps_per_replica, Some(2.0));
    let rag = parse_task_yaml(
        include_str!("../../../examples/ollama-rag-seeweb.yaml"),
        &none,
    )
    .unwrap();
    let svc = rag.service.as_ref().expect("the showcase is a service");
    assert_eq!(svc.readiness_probe.initial_delay_s, 1800);
    assert_eq!(svc.replica_policy.min_replicas, 1);
    let y = include_str!("../../../examples/needs-token.yaml");
    assert_eq!(parse_task_yaml(y, &none).unwrap_err().path, "envs.HF_TOKEN");
    let mut o = BTreeMap::new();
    o.insert("HF_TOKEN".to_string(), "hf_x".to_string());
    assert_eq!(parse_task_yaml(y, &o).unwrap().envs["HF_TOKEN"], "hf_x");
}

#[test]
fn skypilot_reference_task_parses() {
    // The example from skypilot-compat.md, whole.
    let y = "name: llama-ft\nnum_nodes: 2\nresources:\n  accelerators: {H100: 8}\n  use_spot: true\n  any_of:\n    - infra: aws/us-east-1\n    - infra: aws/us-west-2\n      use_spot: false\nfile_mounts:\n  /ckpt: {name: llama-ft-ckpt, store: s3, mode: MOUNT_CACHED}\nenvs: {EPOCHS: \"3\", HF_TOKEN: null}\nsetup: pip install -r requirements.txt\nrun: torchrun train.py\n";
    let mut o = BTreeMap::new();
    o.insert("HF_TOKEN".to_string(), "t".to_string());
    let s = parse_task_yaml(y, &o).unwrap();
    assert_eq!(s.resources.candidates.len(), 2);
    assert_eq!(
        s.resources.candidates[0].infra.region.as_deref(),
        Some("us-east-1")
    );
    let with_recovery = y.replace(
        "  use_spot: true\n",
        "  use_spot: true\n  job_recovery: {strategy: EAGER_NEXT_REGION, max_restarts_on_errors: 2, recover_on_exit_codes: [75]}\n",
    );
    let r = parse_task_yaml(&with_recovery, &o)
        .unwrap()
        .recovery
        .unwrap();
    assert_eq!(r.strategy, RecoveryStrategy::EagerNextRegion);
    assert_eq!(
        (r.max_restarts_on_errors, r.recover_on_exit_codes),
        (2, vec![75])
    );
}

#[test]
fn job_recovery_and_checkpoint_are_checked_field_by_field() {
    let ok = |y: &str| parse_task_yaml(y, &BTreeMap::new()).unwrap();
    assert_eq!(
        ok("resources: {job_recovery: failover}")
            .recovery
            .unwrap()
            .strategy,
        RecoveryStrategy::Failover
    );
    let r = ok("resources: {job_recovery: {recover_on_exit_codes: 3}}")
        .recovery
        .unwrap();
    assert_eq!(r.recover_on_exit_codes, vec![3]);
    for (y, path) in [
        (
            "resources: {job_recovery: SOMETIMES}",
            "resources.job_recovery",
        ),
        (
            "resources: {job_recovery: {strategy: X}}",
            "resources.job_recovery.strategy",
        ),
        (
            "resources: {job_recovery: {max_restarts_on_errors: -1}}",
            "resources.job_recovery.max_restarts_on_errors",
        ),
        (
            "resources: {job_recovery: {recover_on_exit_codes: [300]}}",
            "resources.job_recovery.recover_on_exit_codes",
        ),
        (
            "resources: {job_recovery: {retries: 1}}",
            "resources.job_recovery.retries",
        ),
        (
            "resources: {any_of: [{job_recovery: FAILOVER}]}",
            "resources.any_of[0].job_recovery",
        ),
        ("checkpoint: {path: /ckpt}", "checkpoint.store"),
        (
            "checkpoint: {store: http://x, path: /ckpt}",
            "checkpoint.store",
        ),
        ("checkpoint: {store: file:///b/p}", "checkpoint.path"),
        (
            "checkpoint: {store: gs://b/p, path: /c}",
            "checkpoint.store",
        ),
        (
            "checkpoint: {store: file:///b/p, path: ckpt}",
            "checkpoint.path",
        ),
        (
            "checkpoint: {store: file:///b/p, path: /c, interval: soon}",
            "checkpoint.interval",
        ),
        (
            "checkpoint: {store: file:///b/p, path: /c, signal: SIGKILL}",
            "checkpoint.signal",
        ),
        (
            "checkpoint: {store: file:///b/p, path: /c, every: 1}",
            "checkpoint.every",
        ),
    ] {
        let e = parse_task_yaml(y, &BTreeMap::new()).unwrap_err();
        assert_eq!(e.path, path, "{y}");
    }
    let c =
        ok("checkpoint: {store: file:///bucket/run1/, path: /ckpt/, interval: 2m, signal: usr2}")
            .checkpoint
            .unwrap();
    assert_eq!(
        (
            c.store.as_str(),
            c.path.as_str(),
            c.interval_s,
            c.signal.as_str()
        ),
        ("file:///bucket/run1", "/ckpt", 120, "SIGUSR2")
    );
    assert_eq!(
        ok("checkpoint: {store: s3://bucket/run, path: /c}")
            .checkpoint
            .unwrap()
            .interval_s,
        60
    );
}
