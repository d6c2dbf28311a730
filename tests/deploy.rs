//! The runner fleet files in deploy/arc are what actions-runner-controller's
//! gha-runner-scale-set chart and Kubernetes accept, and agree with the workflows. The chart's
//! published values.schema.json constrains only `listenerConfig` (which these values do not
//! set), so the rest is checked structurally here: the keys the chart reads, with the types its
//! templates need.

use std::path::PathBuf;

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml(rel: &str) -> Value {
    serde_saphyr::from_str(&std::fs::read_to_string(repo().join(rel)).unwrap()).unwrap()
}

/// Problems with a gha-runner-scale-set values document for the GPU gate.
fn problems(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let known = [
        "githubConfigUrl", "githubConfigSecret", "proxy", "maxRunners", "minRunners", "runnerGroup", "runnerScaleSetName", "fullnameOverride",
        "githubServerTLS", "keyVault", "containerMode", "listenerTemplate", "listenerMetrics", "listenerConfig", "template", "controllerServiceAccount",
        "namespaceOverride", "annotations", "labels", "resourceMeta",
    ];
    for k in v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()).unwrap_or_default() {
        if !known.contains(&k.as_str()) {
            out.push(format!("`{k}` is not a value the chart reads"));
        }
    }
    match v["githubConfigUrl"].as_str() {
        Some(u) if u.starts_with("https://") => {}
        _ => out.push("githubConfigUrl must be an https URL of a repository or organisation".into()),
    }
    if !v["githubConfigSecret"].is_string() {
        out.push("githubConfigSecret must name a pre-made secret: a token or key must not sit in a committed values file".into());
    }
    if v["runnerScaleSetName"].as_str() != Some("gpu") {
        out.push("runnerScaleSetName must be `gpu`, the label the workflows' GPU jobs ask for".into());
    }
    match (v["minRunners"].as_u64(), v["maxRunners"].as_u64()) {
        (Some(min), Some(max)) if min <= max && max > 0 => {}
        _ => out.push("minRunners and maxRunners must be whole numbers with 0 ≤ min ≤ max, max > 0".into()),
    }
    let spec = &v["template"]["spec"];
    let Some(containers) = spec["containers"].as_array() else {
        out.push("template.spec.containers is missing".into());
        return out;
    };
    let Some(runner) = containers.iter().find(|c| c["name"] == "runner") else {
        out.push("no container named `runner` (the chart patches that one)".into());
        return out;
    };
    if !runner["image"].as_str().is_some_and(|i| i.contains(':')) {
        out.push("the runner container needs an image with a tag".into());
    }
    if runner["command"] != serde_json::json!(["/home/runner/run.sh"]) {
        out.push("the runner container must run /home/runner/run.sh".into());
    }
    let gpus = &runner["resources"]["limits"]["nvidia.com/gpu"];
    if !(gpus.as_u64().is_some_and(|n| n >= 1) || gpus.as_str().and_then(|s| s.parse::<u64>().ok()).is_some_and(|n| n >= 1)) {
        out.push("the runner must ask the NVIDIA device plugin for a GPU (resources.limits nvidia.com/gpu ≥ 1)".into());
    }
    let volumes: Vec<&str> = spec["volumes"].as_array().into_iter().flatten().filter_map(|v| v["name"].as_str()).collect();
    let mounts: Vec<(&str, &str)> = runner["volumeMounts"].as_array().into_iter().flatten().filter_map(|m| Some((m["name"].as_str()?, m["mountPath"].as_str()?))).collect();
    for (name, _) in &mounts {
        if !volumes.contains(name) {
            out.push(format!("volumeMount `{name}` has no volume"));
        }
    }
    let cache = runner["env"].as_array().into_iter().flatten().find(|e| e["name"] == "LORAGATE_CACHE").and_then(|e| e["value"].as_str());
    match cache {
        Some(c) if mounts.iter().any(|(_, p)| c.starts_with(p) && *p != "/home/runner/_work") => {}
        _ => out.push("LORAGATE_CACHE must point into a mounted volume that outlives the job".into()),
    }
    let tolerates = spec["tolerations"].as_array().into_iter().flatten().any(|t| t["key"] == "nvidia.com/gpu");
    if !tolerates {
        out.push("the pod must tolerate the nvidia.com/gpu taint of GPU nodes".into());
    }
    out
}

#[test]
fn the_gpu_runner_scale_set_values_fit_the_chart_and_the_workflows() {
    let v = yaml("deploy/arc/values-gpu.yaml");
    assert_eq!(problems(&v), Vec::<String>::new());
    // The GPU jobs of the gate ask for the scale set by name.
    let gate = yaml(".github/workflows/lora-gate.yml");
    for job in ["gate", "accept-baselines"] {
        assert_eq!(gate["jobs"][job]["runs-on"], "gpu", "{job}");
    }
    // The cache volume is a claim this folder defines, shareable by many runners.
    let claim = v["template"]["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "loragate-cache").unwrap()["persistentVolumeClaim"]["claimName"].clone();
    let pvc = yaml("deploy/arc/cache-pvc.yaml");
    assert_eq!(pvc["kind"], "PersistentVolumeClaim");
    assert_eq!(pvc["metadata"]["name"], claim);
    assert_eq!(pvc["spec"]["accessModes"], serde_json::json!(["ReadWriteMany"]));
    // The runner image has CUDA 13 and cuDNN.
    let docker = std::fs::read_to_string(repo().join("deploy/arc/runner.Dockerfile")).unwrap();
    let from = docker.lines().find(|l| l.starts_with("FROM ")).unwrap();
    assert!(from.contains("nvidia/cuda:13.0") && from.contains("cudnn"), "{from}");
}

#[test]
fn the_structural_check_catches_broken_values() {
    let bad: Value = serde_saphyr::from_str(
        "githubConfigUrl: github.com/x\ngithubConfigSecret:\n  github_token: ghp_x\nrunnerScaleSetName: other\nminRunners: 3\nmaxRunners: 1\nreplicas: 2\n\
         template:\n  spec:\n    containers:\n      - name: runner\n        image: runner\n        volumeMounts:\n          - name: nowhere\n            mountPath: /x\n",
    )
    .unwrap();
    let p = problems(&bad).join("\n");
    for needle in ["`replicas`", "https URL", "pre-made secret", "`gpu`", "0 ≤ min ≤ max", "image with a tag", "run.sh", "nvidia.com/gpu ≥ 1", "`nowhere` has no volume", "LORAGATE_CACHE", "taint"] {
        assert!(p.contains(needle), "missed {needle}:\n{p}");
    }
}
