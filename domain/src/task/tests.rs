use super::*;

fn parse(y: &str) -> Result<TaskSpec> {
    parse_task_yaml(y, &BTreeMap::new())
}

fn err(y: &str) -> SpecError {
    parse(y).expect_err("should be rejected")
}

#[test]
fn minimal_task_defaults_to_one_node_and_any_resources() {
    let s = parse("run: echo hi\n").unwrap();
    assert_eq!(s.num_nodes, 1);
    assert_eq!(s.run.as_deref(), Some("echo hi"));
    assert_eq!(s.resources.candidates, vec![ResourceCandidate::default()]);
}

#[test]
fn accelerator_forms() {
    let one = |y: &str| parse(y).unwrap().resources.candidates;
    let a = |n: &str, c: f64| {
        Some(Accelerator {
            name: n.into(),
            count: c,
        })
    };
    assert_eq!(
        one("resources: {accelerators: H100}")[0].accelerator,
        a("H100", 1.0)
    );
    assert_eq!(
        one("resources: {accelerators: 'h100:8'}")[0].accelerator,
        a("H100", 8.0)
    );
    assert_eq!(
        one("resources: {accelerators: {H100: 8}}")[0].accelerator,
        a("H100", 8.0)
    );
    assert_eq!(
        one("resources: {accelerators: 'A100:0.5'}")[0].accelerator,
        a("A100", 0.5)
    );
    let any = parse("resources: {accelerators: {L4: 1, A10G: 1}}").unwrap();
    assert!(!any.resources.ordered);
    assert_eq!(any.resources.candidates.len(), 2);
    let ord = parse("resources: {accelerators: ['H100:8', 'A100:8']}").unwrap();
    assert!(ord.resources.ordered);
    assert_eq!(ord.resources.candidates[1].accelerator, a("A100", 8.0));
    assert_eq!(
        one("resources: {accelerators: '{H100: 2}'}")[0].accelerator,
        a("H100", 2.0)
    );
}

#[test]
fn bad_accelerators_name_the_field() {
    for y in [
        "resources: {accelerators: 'H100:-1'}",
        "resources: {accelerators: 'H100:abc'}",
        "resources: {accelerators: 'H100:0'}",
        "resources: {accelerators: 'H100:1.5'}",
        "resources: {accelerators: {H100: -2}}",
        "resources: {accelerators: 'H 100'}",
        "resources: {accelerators: []}",
    ] {
        let e = err(y);
        assert_eq!(e.path, "resources.accelerators", "{y}: {e}");
    }
    assert!(err("resources: {accelerators: 'H100:-1'}")
        .message
        .contains("positive"));
    assert!(err("resources: {accelerators: 'H100:abc'}")
        .message
        .contains("not a number"));
}

#[test]
fn num_nodes_must_be_positive() {
    assert_eq!(err("num_nodes: 0").path, "num_nodes");
    assert_eq!(err("num_nodes: -3").path, "num_nodes");
    assert_eq!(err("num_nodes: two").path, "num_nodes");
    assert_eq!(parse("num_nodes: 4").unwrap().num_nodes, 4);
}

#[test]
fn storage_objects_name_fill_and_mount_their_bucket() {
    let t = parse_task_yaml(
        "file_mounts:\n  /ckpt: {name: my-ckpt, source: ~/ckpt}\n  /ds: {source: s3://datasets, mode: MOUNT_CACHED, config: {mount_cached: {read_only: true}}}\n  /empty: {name: fresh-bucket, mode: copy}\n  /ro: {source: s3://models, type: MODEL_CHECKPOINT_RO}\n",
        &Default::default(),
    )
    .unwrap();
    assert_eq!(
        t.file_mounts["/ckpt"],
        MountSource::Storage(StorageMount {
            bucket: "s3://my-ckpt".into(),
            create: true,
            local: Some(("~/ckpt".into(), None)),
            mode: StorageMode::Mount,
            read_only: false,
            rclone: BTreeMap::new(),
            ephemeral: false,
        })
    );
    assert_eq!(t.file_mounts["/ckpt"].local(), Some(("~/ckpt", None)));
    let MountSource::Storage(ds) = &t.file_mounts["/ds"] else {
        panic!("{:?}", t.file_mounts["/ds"])
    };
    assert_eq!(
        (ds.create, ds.mode, ds.read_only),
        (false, StorageMode::MountCached, true)
    );
    let MountSource::Storage(empty) = &t.file_mounts["/empty"] else {
        panic!()
    };
    assert_eq!(
        (empty.create, empty.mode, &empty.local),
        (true, StorageMode::Copy, &None)
    );
    let MountSource::Storage(ro) = &t.file_mounts["/ro"] else {
        panic!()
    };
    assert_eq!((ro.mode, ro.read_only), (StorageMode::MountCached, true));
    let knobs = |s: &StorageMount| {
        s.rclone
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        knobs(ro),
        "vfs_read_chunk_size=32M vfs_read_chunk_streams=16"
    );
    // rclone's knobs, over the preset; checked by form, naming the field.
    let t = parse_task_yaml(
        "file_mounts:\n  /w: {name: w-bucket, type: DATASET_RW, config: {mount_cached: {transfers: 4, vfs_cache_max_size: 50G, vfs_write_back: 1h30m, buffer_size: 64M}}}\n",
        &Default::default(),
    )
    .unwrap();
    let MountSource::Storage(w) = &t.file_mounts["/w"] else {
        panic!()
    };
    assert_eq!(
        knobs(w),
        "buffer_size=64M transfers=4 vfs_cache_max_size=50G vfs_read_chunk_size=8M \
         vfs_read_chunk_streams=0 vfs_write_back=1h30m"
    );
    for (cfg, key) in [
        ("{transfers: 0}", "transfers"),
        ("{vfs_cache_max_size: 10GB}", "vfs_cache_max_size"),
        ("{vfs_write_back: soon}", "vfs_write_back"),
        ("{vfs_cache_max_age: 5x}", "vfs_cache_max_age"),
        ("{fast_list: true}", "fast_list"),
    ] {
        let e = err(&format!(
            "file_mounts: {{/d: {{name: my-b, mode: MOUNT_CACHED, config: {{mount_cached: {cfg}}}}}}}"
        ));
        assert_eq!(
            e.path,
            format!("file_mounts./d.config.mount_cached.{key}"),
            "{e}"
        );
    }
    let e =
        err("file_mounts: {/d: {name: my-b, mode: COPY, config: {mount_cached: {transfers: 2}}}}");
    assert_eq!(e.path, "file_mounts./d.config.mount_cached");
    // `$VARS` in a storage object's fields are the task's envs (SkyPilot's
    // airflow example names its bucket and store so).
    let t = parse_task_yaml(
        "envs: {BUCKET: sky-demo-data, STORE: s3}\nfile_mounts:\n  /data: {name: $BUCKET, store: $STORE}\n",
        &Default::default(),
    )
    .unwrap();
    let MountSource::Storage(d) = &t.file_mounts["/data"] else {
        panic!()
    };
    assert_eq!(d.bucket, "s3://sky-demo-data");
    let mut over = BTreeMap::new();
    over.insert("BUCKET".to_string(), "from-the-cli".to_string());
    let t = parse_task_yaml(
        "envs: {BUCKET: null}\nfile_mounts:\n  /data: {name: $BUCKET}\n",
        &over,
    )
    .unwrap();
    let MountSource::Storage(d) = &t.file_mounts["/data"] else {
        panic!()
    };
    assert_eq!(d.bucket, "s3://from-the-cli");
    for bad in ["ab", "Upper", "a..b", "192.168.1.1", "xn--x", "-ab", "ab-"] {
        let e = err(&format!("file_mounts: {{/d: {{name: '{bad}'}}}}"));
        assert_eq!(e.path, "file_mounts./d.name", "{bad}");
    }
}

#[test]
fn the_set_form_of_accelerators_holds_counts_in_its_keys() {
    // As YAML reads `{H100:8, H200:8}`: two keys with no values.
    let t = parse_task_yaml(
        "resources: {accelerators: {H100:8, H200:8}}\n",
        &Default::default(),
    )
    .unwrap();
    let accs: Vec<String> = t
        .resources
        .candidates
        .iter()
        .map(|c| c.accelerator.as_ref().unwrap().to_string())
        .collect();
    assert_eq!(accs, ["H100:8", "H200:8"]);
    assert_eq!(t.gpus_per_node(1), 8);
}

#[test]
fn a_git_workdir_is_a_url_and_a_ref() {
    let t = parse_task_yaml(
        "workdir: {url: 'https://github.com/skypilot-org/skypilot.git', ref: v0.10.0}\n",
        &Default::default(),
    )
    .unwrap();
    assert_eq!(
        t.workdir_git,
        Some(GitWorkdir {
            url: "https://github.com/skypilot-org/skypilot.git".into(),
            git_ref: Some("v0.10.0".into())
        })
    );
    assert_eq!(t.workdir, None);
    assert!(to_normalized_yaml(&t).contains("ref: v0.10.0"));
    let t = parse_task_yaml(
        "workdir: {url: 'git@github.com:org/repo.git'}\n",
        &Default::default(),
    )
    .unwrap();
    assert_eq!(t.workdir_git.unwrap().git_ref, None);
    for (bad, path) in [
        ("workdir: {url: 'http://x/y.git'}", "workdir.url"),
        ("workdir: {url: '--upload-pack=evil'}", "workdir.url"),
        ("workdir: {ref: main}", "workdir.url"),
        (
            "workdir: {url: 'https://x/y.git', ref: '--orphan'}",
            "workdir.ref",
        ),
        (
            "workdir: {url: 'https://x/y.git', branch: main}",
            "workdir.branch",
        ),
    ] {
        assert_eq!(err(bad).path, path, "{bad}");
    }
}

#[test]
fn the_old_experimental_section_points_to_config() {
    let e = err("experimental: {config_overrides: {docker: {run_options: [-x]}}}");
    assert_eq!(e.path, "experimental");
    assert!(e.message.contains("`config`"), "{e}");
}

#[test]
fn unknown_fields_are_rejected_with_a_hint() {
    let e = err("nmae: x");
    assert_eq!(e.path, "nmae");
    assert!(e.message.contains("did you mean 'name'"), "{e}");
    let e = err("resources: {acelerators: H100}");
    assert_eq!(e.path, "resources.acelerators");
    assert!(e.message.contains("accelerators"));
    let e = err("resources: {spot_recovery: FAILOVER}");
    assert!(e.message.contains("job_recovery"));
    let e = err("resources: {any_of: [{infra: local, bogus: 1}]}");
    assert_eq!(e.path, "resources.any_of[0].bogus");
}

#[test]
fn known_but_unsupported_fields_are_rejected_not_ignored() {
    let e = err("file_mounts: {/data: {name: b, source: ./x, mode: COPY}}");
    assert_eq!(e.path, "file_mounts./data.name");
    assert!(e.message.contains("bucket name"), "{e}");
    // Only whole buckets mount (MOUNT is the default mode).
    let e = err("file_mounts: {/data: {source: s3://b/p}}");
    assert_eq!(e.path, "file_mounts./data.source");
    assert!(
        e.message.contains("whole") && e.message.contains("COPY"),
        "{e}"
    );
    let e = err("file_mounts: {/data: {source: ./x}}");
    assert_eq!(e.path, "file_mounts./data.name");
    let e = err("file_mounts: {/data: {source: s3://other, persistent: false}}");
    assert_eq!(e.path, "file_mounts./data.persistent");
    // rclone's knobs tune MOUNT_CACHED only (MOUNT is the default mode).
    let e = err("file_mounts: {/data: {name: my-ckpt, config: {mount_cached: {transfers: 8}}}}");
    assert_eq!(e.path, "file_mounts./data.config.mount_cached");
    let e = err("file_mounts: {/data: {name: my-ckpt, type: DATASET_RO, mode: COPY}}");
    assert_eq!(e.path, "file_mounts./data.type");
    let ok = parse_task_yaml(
        "file_mounts: {/data: {source: s3://b/p, mode: copy, persistent: true}}",
        &Default::default(),
    )
    .unwrap();
    assert_eq!(ok.file_mounts["/data"], MountSource::Uri("s3://b/p".into()));
    assert_eq!(
        err("file_mounts: {/d: {source: gs://b, mode: COPY, store: gcs}}").path,
        "file_mounts./d.store"
    );
    // R2 buckets: named (store: r2), or a whole r2:// bucket mounted.
    let r2 = parse_task_yaml(
        "file_mounts:\n  /ckpt: {name: my-ckpt, store: r2, mode: MOUNT_CACHED}\n  /data: {source: r2://shared, mode: MOUNT}\n",
        &Default::default(),
    )
    .unwrap();
    let buckets: Vec<&str> = r2
        .file_mounts
        .values()
        .filter_map(|m| match m {
            MountSource::Storage(s) => Some(s.bucket.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(buckets, ["r2://my-ckpt", "r2://shared"]);
    assert_eq!(
        err("file_mounts: {/d: {source: s3://b, mode: COPY, name: x}}").path,
        "file_mounts./d.name"
    );
    assert_eq!(
        err("file_mounts: {/d: {source: s3://b, mode: FAST}}").path,
        "file_mounts./d.mode"
    );
    assert_eq!(
        err("file_mounts: {/d: {source: s3://b, bogus: 1}}").path,
        "file_mounts./d.bogus"
    );
    let e = err("resources: {image_id: 'docker:-v/etc:/x'}");
    assert_eq!(e.path, "resources.image_id");
}

#[test]
fn priority_is_a_whole_number_from_0_to_1000_for_the_whole_task() {
    assert_eq!(parse("run: x").unwrap().priority, None);
    assert_eq!(
        parse("resources: {priority: 1000}\nrun: x")
            .unwrap()
            .priority,
        Some(1000)
    );
    assert_eq!(parse("resources: {priority: 0}").unwrap().priority, Some(0));
    for bad in ["1001", "-1", "2.5", "high", "'7'"] {
        let e = err(&format!("resources: {{priority: {bad}}}"));
        assert_eq!(e.path, "resources.priority", "{bad}: {e}");
    }
    // One for the task, not one per candidate.
    let e = err("resources: {any_of: [{priority: 5}]}");
    assert_eq!(e.path, "resources.any_of[0].priority");
}

#[test]
fn malformed_yaml_is_an_error_not_a_panic() {
    let e = err("run: [unclosed");
    assert_eq!(e.path, "task");
    assert!(e.message.contains("invalid YAML"));
    assert_eq!(err("- just\n- a list").path, "task");
    assert!(err("name: a\n---\nname: b").message.contains("documents"));
}

#[test]
fn null_envs_must_come_from_the_command_line() {
    let y = "envs: {EPOCHS: 3, HF_TOKEN: null}\nrun: x";
    let e = err(y);
    assert_eq!(e.path, "envs.HF_TOKEN");
    let mut o = BTreeMap::new();
    o.insert("HF_TOKEN".to_string(), "t0k".to_string());
    let s = parse_task_yaml(y, &o).unwrap();
    assert_eq!(s.envs["EPOCHS"], "3");
    assert_eq!(s.envs["HF_TOKEN"], "t0k");
    assert_eq!(err("envs: {1BAD: x}").path, "envs.1BAD");
}

#[test]
fn cpus_memory_and_infra() {
    let c = &parse("resources: {cpus: 8+, memory: 4x, infra: local/us-east}")
        .unwrap()
        .resources
        .candidates[0];
    assert_eq!(
        c.cpus,
        Some(Quantity {
            value: 8.0,
            at_least: true
        })
    );
    assert!(c.memory.unwrap().per_cpu);
    assert_eq!(c.infra.cloud.as_deref(), Some("local"));
    assert_eq!(c.infra.region.as_deref(), Some("us-east"));
    assert_eq!(err("resources: {cpus: -1}").path, "resources.cpus");
    assert_eq!(err("resources: {memory: lots}").path, "resources.memory");
    assert_eq!(err("resources: {infra: a/b/c/d}").path, "resources.infra");
    assert_eq!(
        err("resources: {infra: local, cloud: aws}").path,
        "resources.cloud"
    );
    let legacy = parse("resources: {cloud: AWS, region: us-east-1}").unwrap();
    assert_eq!(
        legacy.resources.candidates[0].infra.cloud.as_deref(),
        Some("aws")
    );
}

#[test]
fn any_of_overrides_base_fields() {
    let s = parse(
        "resources:\n  accelerators: {H100: 8}\n  use_spot: true\n  any_of:\n    - infra: aws/us-east-1\n    - infra: aws/us-west-2\n      use_spot: false\n",
    )
    .unwrap();
    let c = &s.resources.candidates;
    assert_eq!(c.len(), 2);
    assert!(c[0].use_spot && !c[1].use_spot);
    assert_eq!(c[1].accelerator.as_ref().unwrap().count, 8.0);
    assert_eq!(err("resources: {any_of: [], }").path, "resources.any_of");
}

#[test]
fn secrets_are_redacted_in_normalized_yaml() {
    let s = parse("secrets: {KEY: hunter2}\nrun: echo").unwrap();
    assert_eq!(s.secrets["KEY"], "hunter2");
    let y = to_normalized_yaml(&s);
    assert!(!y.contains("hunter2"), "{y}");
    assert!(y.contains(REDACTED));
    let back = parse(&y.replace(REDACTED, "x")).unwrap();
    assert_eq!(back.num_nodes, 1);
}

#[test]
fn file_mounts_take_local_paths_and_bucket_uris_with_skypilots_rules() {
    let ok = parse_task_yaml(
        "file_mounts:\n  /data: s3://bucket/prefix\n  ~/model.bin: https://example.com/m.bin\n  code: ~/src\n",
        &Default::default(),
    )
    .unwrap();
    assert_eq!(
        ok.file_mounts["/data"],
        MountSource::Uri("s3://bucket/prefix".into())
    );
    assert_eq!(
        ok.file_mounts["code"],
        MountSource::Local {
            path: "~/src".into(),
            manifest: None
        }
    );
    for (yaml, path, says) in [
        ("file_mounts: {/data/: ~/x}", "file_mounts./data/", "slash"),
        ("file_mounts: {/data: ~/x/}", "file_mounts./data", "slash"),
        ("file_mounts: {../up: ~/x}", "file_mounts.../up", ".."),
        ("file_mounts: {/d: 's3:///x'}", "file_mounts./d", "bucket"),
        (
            "file_mounts: {/d: 'gs://b'}",
            "file_mounts./d",
            "no provider",
        ),
        ("file_mounts: {/d: 'http://x/y'}", "file_mounts./d", "https"),
        (
            "file_mounts: {/d: 'ftp://x/y'}",
            "file_mounts./d",
            "unknown scheme",
        ),
        ("file_mounts: {/d: 3}", "file_mounts./d", "expected"),
        ("file_mounts: [a]", "file_mounts", ""),
        (
            "workdir: .\nfile_mounts: {~/sky_workdir: ~/x}",
            "file_mounts.~/sky_workdir",
            "workdir",
        ),
    ] {
        let e = err(yaml);
        assert_eq!(e.path, path, "{yaml}: {e}");
        assert!(e.message.contains(says), "{yaml}: {e}");
    }
}

#[test]
fn ports_and_disks_take_skypilots_forms() {
    let t = parse_task_yaml(
        "resources:\n  ports: [8888, '8000-8010', 8005, 9000]\n  disk_size: 1TB\n  disk_tier: HIGH\n",
        &Default::default(),
    )
    .unwrap();
    let c = &t.resources.candidates[0];
    let shown: Vec<String> = c.ports.iter().map(ToString::to_string).collect();
    assert_eq!(shown, ["8000-8010", "8888", "9000"]);
    assert_eq!(c.disk_size_gb, Some(1024));
    assert_eq!(c.disk_tier, Some(DiskTier::High));
    let t = parse_task_yaml(
        "resources: {ports: 22, disk_size: '1.5TiB'}\n",
        &Default::default(),
    )
    .unwrap();
    assert_eq!(t.resources.candidates[0].disk_size_gb, Some(1536));
    assert_eq!(
        PortRange::ports(&t.resources.candidates[0].ports).collect::<Vec<_>>(),
        [22]
    );
}

#[test]
fn file_mount_paths_take_the_tasks_envs() {
    let t = parse_task_yaml(
        "envs: {BUCKET: my-data, SPLIT: train}\nfile_mounts:\n  /data/${SPLIT}: s3://$BUCKET/$SPLIT\n  /x/$NOPE: ./src\n",
        &Default::default(),
    )
    .unwrap();
    assert_eq!(
        t.file_mounts["/data/train"],
        MountSource::Uri("s3://my-data/train".into())
    );
    assert!(
        t.file_mounts.contains_key("/x/$NOPE"),
        "{:?}",
        t.file_mounts
    );
}

#[test]
fn a_vm_image_is_per_region_or_for_all_and_a_docker_image_is_the_container() {
    let t = parse_task_yaml("resources: {image_id: ami-1}\n", &Default::default()).unwrap();
    assert_eq!(
        t.resources.candidates[0].image_for("us-east-1").as_deref(),
        Some("ami-1")
    );
    assert_eq!(t.resources.candidates[0].docker_image, None);
    let t = parse_task_yaml(
        "resources: {image_id: {us-east-1: ami-1, eu-west-1: ami-2}}\n",
        &Default::default(),
    )
    .unwrap();
    let c = &t.resources.candidates[0];
    assert_eq!(c.image_for("eu-west-1").as_deref(), Some("ami-2"));
    assert_eq!(c.image_for("us-west-2"), None);

    let t = parse_task_yaml(
        "resources: {image_id: 'docker:ubuntu:22.04'}\n",
        &Default::default(),
    )
    .unwrap();
    let c = &t.resources.candidates[0];
    assert_eq!(c.docker_image.as_deref(), Some("ubuntu:22.04"));
    assert!(c.image_id.is_empty(), "a container image is not a VM image");
    assert_eq!(
        t.container_image(0, &t.envs).as_deref(),
        Some("ubuntu:22.04")
    );
    // The `docker` key beside VM images.
    let t = parse_task_yaml(
        "resources: {image_id: {docker: 'nvcr.io/nvidia/pytorch:24.01-py3', us-east-1: ami-1}}\n",
        &Default::default(),
    )
    .unwrap();
    let c = &t.resources.candidates[0];
    assert_eq!(
        c.docker_image.as_deref(),
        Some("nvcr.io/nvidia/pytorch:24.01-py3")
    );
    assert_eq!(c.image_for("us-east-1").as_deref(), Some("ami-1"));
    // An `any_of` entry's image replaces the base's, container and all.
    let t = parse_task_yaml(
        "resources:\n  image_id: docker:ubuntu\n  any_of:\n    - {cpus: 2}\n    - {image_id: ami-9}\n",
        &Default::default(),
    )
    .unwrap();
    let cs = &t.resources.candidates;
    assert_eq!(cs[0].docker_image.as_deref(), Some("ubuntu"));
    assert_eq!(
        (
            cs[1].docker_image.as_deref(),
            cs[1].image_for("x").as_deref()
        ),
        (None, Some("ami-9"))
    );
    for (bad, path) in [
        (
            "resources: {image_id: {us-east-1: 'docker:x'}}",
            "resources.image_id.us-east-1",
        ),
        ("resources: {image_id: 'docker:'}", "resources.image_id"),
        ("resources: {image_id: 'docker:a b'}", "resources.image_id"),
        (
            "resources: {image_id: 'docker:--privileged'}",
            "resources.image_id",
        ),
        (
            "resources: {image_id: {docker: ''}}",
            "resources.image_id.docker",
        ),
    ] {
        assert_eq!(err(bad).path, path, "{bad}");
    }
}

#[test]
fn config_gives_the_container_engine_flags_and_network_tier_standard_is_the_default() {
    let t = parse_task_yaml(
        "resources: {image_id: docker:ubuntu, network_tier: standard}\nconfig: {docker: {run_options: ['--cap-add SYS_PTRACE', --ipc=host]}}\n",
        &Default::default(),
    )
    .unwrap();
    assert_eq!(
        t.docker_run_options,
        ["--cap-add", "SYS_PTRACE", "--ipc=host"]
    );
    assert!(to_normalized_yaml(&t).contains("--ipc=host"));
    for (bad, path) in [
        (
            "config: {docker: {run_options: [-x]}}",
            "config.docker.run_options",
        ),
        (
            "resources: {image_id: docker:u}\nconfig: {kubernetes: {pod_config: {}}}",
            "config.kubernetes",
        ),
        (
            "resources: {image_id: docker:u}\nconfig: {jobs: {}}",
            "config.jobs",
        ),
        (
            "resources: {image_id: docker:u}\nconfig: {docker: {bogus: 1}}",
            "config.docker.bogus",
        ),
        ("resources: {network_tier: best}", "resources.network_tier"),
        ("resources: {network_tier: fast}", "resources.network_tier"),
    ] {
        assert_eq!(err(bad).path, path, "{bad}");
    }
}

#[test]
fn a_private_registry_login_comes_whole_and_prefixes_the_image() {
    let t = parse_task_yaml(
        "resources: {image_id: 'docker:team/trainer:3'}\n\
         secrets: {SKYPILOT_DOCKER_USERNAME: u, SKYPILOT_DOCKER_PASSWORD: p, SKYPILOT_DOCKER_SERVER: registry.example.com}\n",
        &Default::default(),
    )
    .unwrap();
    assert_eq!(
        t.container_image(0, &t.secrets).as_deref(),
        Some("registry.example.com/team/trainer:3")
    );
    let t = parse_task_yaml(
        "resources: {image_id: 'docker:registry.example.com/team/trainer:3'}\n\
         envs: {SKYPILOT_DOCKER_USERNAME: u, SKYPILOT_DOCKER_PASSWORD: p, SKYPILOT_DOCKER_SERVER: registry.example.com}\n",
        &Default::default(),
    )
    .unwrap();
    assert_eq!(
        t.container_image(0, &t.envs).as_deref(),
        Some("registry.example.com/team/trainer:3"),
        "not prefixed twice"
    );
    let e = err("resources: {image_id: 'docker:x'}\n\
         envs: {SKYPILOT_DOCKER_USERNAME: u, SKYPILOT_DOCKER_SERVER: r}\n\
         secrets: {SKYPILOT_DOCKER_PASSWORD: p}\n");
    assert_eq!(e.path, "envs.SKYPILOT_DOCKER_PASSWORD");
    assert!(e.message.contains("together"), "{e}");
    let e = err("secrets: {SKYPILOT_DOCKER_PASSWORD: p}\n");
    assert_eq!(e.path, "secrets.SKYPILOT_DOCKER_USERNAME");
}

#[test]
fn a_service_parses_and_survives_the_normalized_round_trip() {
    // Once refused ("Nembo does not serve yet"): `service:` now parses.
    for y in [
        "service: {readiness_probe: /health, replicas: 2}\nresources: {ports: 8080}\nrun: x",
        "service:\n  readiness_probe:\n    path: /v1/completions\n    post_data: {model: m, prompt: hi, max_tokens: 1}\n    headers: {Authorization: Bearer t}\n    timeout_seconds: 30\n  replica_policy:\n    min_replicas: 0\n    max_replicas: 4\n    target_qps_per_replica: 2.5\n    num_overprovision: 1\n    base_ondemand_fallback_replicas: 1\n    dynamic_ondemand_fallback: true\n  load_balancing_policy: round_robin\n  ports: 8081\n  tls: {keyfile: /k.pem, certfile: /c.pem}\n  load_balancer: {stream_timeout_seconds: 300}\nresources:\n  accelerators: {L4: 1, A10G: 1}\n  use_spot: true\n  ports: 22\nrun: x",
        "service: {replica_policy: {min_replicas: 3}}\nresources: {ports: 8080}\nrun: x",
    ] {
        let first = parse(y).unwrap();
        assert!(first.service.is_some());
        let shown = to_normalized_yaml(&first);
        assert!(shown.contains("service:"), "{shown}");
        let again = parse(&shown).unwrap_or_else(|e| panic!("{e}\n{shown}"));
        assert_eq!(again.service, first.service, "{shown}");
        assert_eq!(again.resources, first.resources, "{shown}");
    }
}
