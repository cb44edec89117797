//! The spec generated from the shipped manifest, and from edits of it.
use super::*;
use crate::manifest::repo_manifest_path;

fn image() -> ImageConfig {
    ImageConfig {
        entrypoint: vec!["/usr/local/bin/sockmesh".into()],
        cmd: vec!["run".into(), "--kube".into()],
        env: vec!["PATH=/usr/bin:/bin".into()],
        ..Default::default()
    }
}

fn ctx(m: &Manifest) -> PodContext {
    PodContext {
        pod_name: "sockmesh-abc".into(),
        pod_uid: "u-1".into(),
        node_name: "node-a".into(),
        node_ip: "127.100.1.2".parse().unwrap(),
        api_host: "127.0.0.1".into(),
        api_port: 6443,
        volumes: m
            .pod()
            .volumes
            .iter()
            .map(|v| (v.name.clone(), PathBuf::from("/node").join(&v.name)))
            .collect(),
        service_account: Some("/sa".into()),
        cgroups_path: "/c".into(),
        rootfs: "/rootfs".into(),
    }
}

fn spec_of(text: &str) -> Value {
    let m = Manifest::parse(text).expect("manifest");
    spec(&m, &image(), &ctx(&m)).expect("spec")
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|s| s.as_str().expect("string"))
        .collect()
}

fn shipped() -> String {
    std::fs::read_to_string(repo_manifest_path()).expect("deploy/sockmesh.yaml")
}

#[test]
fn the_shipped_manifest_becomes_this_spec() {
    let text = shipped();
    let m = Manifest::parse(&text).unwrap();
    let c = m.container().unwrap();
    let s = spec_of(&text);
    let p = &s["process"];
    // The image's entrypoint, then the manifest's args with $(POD_IP) filled in.
    let args = strings(&p["args"]);
    assert_eq!(args[0], "/usr/local/bin/sockmesh");
    assert_eq!(args.len(), 1 + c.args.as_ref().unwrap().len());
    assert!(
        args.contains(&"--health-addr=127.100.1.2:15090"),
        "{args:?}"
    );
    let env = strings(&p["env"]);
    for want in [
        "PATH=/usr/bin:/bin",
        "NODE_NAME=node-a",
        "POD_IP=127.100.1.2",
        "KUBERNETES_SERVICE_HOST=127.0.0.1",
        "KUBERNETES_SERVICE_PORT=6443",
    ] {
        assert!(env.contains(&want), "{want} in {env:?}");
    }
    let caps = c.security_context.as_ref().unwrap().capabilities.as_ref();
    let want: Vec<String> = caps
        .unwrap()
        .add
        .iter()
        .map(|a| format!("CAP_{a}"))
        .collect();
    assert_eq!(strings(&p["capabilities"]["effective"]), want);
    assert_eq!(strings(&p["capabilities"]["bounding"]), want);
    assert!(p.get("rlimits").is_none());
    assert_eq!(s["root"]["readonly"], true);
    let ns: Vec<&str> = s["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["type"].as_str().unwrap())
        .collect();
    assert!(!ns.contains(&"pid") && !ns.contains(&"network") && !ns.contains(&"uts"));
    // Every volume mount, plus the service account, from where the kubelet put them.
    let mounts = s["mounts"].as_array().unwrap();
    let find = |dst: &str| mounts.iter().find(|m| m["destination"] == dst);
    for vm in &c.volume_mounts {
        let mount = find(&vm.mount_path).unwrap_or_else(|| panic!("{}", vm.mount_path));
        assert_eq!(mount["source"], format!("/node/{}", vm.name));
        let opts = strings(&mount["options"]);
        assert_eq!(opts.contains(&"ro"), vm.read_only, "{}", vm.mount_path);
    }
    assert_eq!(find(SERVICE_ACCOUNT_DIR).unwrap()["source"], "/sa");
    assert_eq!(s["linux"]["resources"]["memory"]["limit"], 512u64 << 20);
}

#[test]
fn a_change_to_the_manifest_changes_the_spec() {
    let text = shipped();
    let base = spec_of(&text);
    let edits = [
        (
            "readOnlyRootFilesystem: true",
            "readOnlyRootFilesystem: false",
        ),
        ("hostPID: true", "hostPID: false"),
        ("- --drain-timeout=20s", "- --drain-timeout=7s"),
        ("value: info", "value: debug"),
        ("- SYS_PTRACE", "- SYS_NICE"),
        ("memory: 512Mi", "memory: 256Mi"),
        ("mountPath: /etc/sockmesh", "mountPath: /etc/sockmesh2"),
    ];
    for (from, to) in edits {
        assert!(text.contains(from), "the manifest no longer has {from:?}");
        let changed = spec_of(&text.replacen(from, to, 1));
        assert_ne!(changed, base, "{from} -> {to} changed nothing");
    }
}

#[test]
fn mounts_are_ordered_so_none_hides_another() {
    let s = spec_of(&shipped());
    let depths: Vec<usize> = s["mounts"].as_array().unwrap()[default_mounts().len()..]
        .iter()
        .map(|m| m["destination"].as_str().unwrap().split('/').count())
        .collect();
    assert!(depths.windows(2).all(|w| w[0] <= w[1]), "{depths:?}");
}

#[test]
fn kubernetes_variable_expansion() {
    let vars = BTreeMap::from([("A".to_string(), "1".to_string())]);
    assert_eq!(expand("x=$(A)", &vars), "x=1");
    assert_eq!(expand("$(B)", &vars), "$(B)");
    assert_eq!(expand("$$(A)", &vars), "$(A)");
    assert_eq!(expand("cost $5 $", &vars), "cost $5 $");
    assert_eq!(expand("$(A", &vars), "$(A");
}
