//! The Kubernetes manifests in docker/: valid for the API server (`kubernetes-validate --strict`,
//! PyPI; `.ci/run` installs it in target/kv-venv), and wired as the README says.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MANIFESTS: [&str; 3] = [
    "docker/deployment.yaml",
    "docker/sidecar.yaml",
    "docker/sidecar-pre-1.29.yaml",
];

fn venv_bin(name: &str) -> PathBuf {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/kv-venv/bin")
        .join(name);
    assert!(
        bin.exists(),
        "no {}: install it with `python3 -m venv target/kv-venv && target/kv-venv/bin/pip install kubernetes-validate` (.ci/run does)",
        bin.display()
    );
    bin
}

fn validate(files: &[&Path], version: Option<&str>) -> Output {
    let mut command = Command::new(venv_bin("kubernetes-validate"));
    command.arg("--strict");
    if let Some(version) = version {
        command.args(["-k", version]);
    }
    command
        .args(files)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run kubernetes-validate")
}

fn report(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn manifests_validate_strictly() {
    let files: Vec<&Path> = MANIFESTS.iter().map(Path::new).collect();
    let output = validate(&files, None);
    assert!(output.status.success(), "{}", report(&output));
    // The variant for clusters before native sidecars, against the last of them.
    let output = validate(&[Path::new("docker/sidecar-pre-1.29.yaml")], Some("1.28.0"));
    assert!(output.status.success(), "{}", report(&output));
}

/// The check can fail: a field the API does not know is rejected.
#[test]
fn an_unknown_field_fails_validation() {
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/sidecar.yaml"))
            .unwrap();
    let broken = manifest.replacen(
        "          restartPolicy: Always\n",
        "          restartPolicy: Always\n          drainPolicy: Always\n",
        1,
    );
    assert_ne!(broken, manifest);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.yaml");
    std::fs::write(&path, broken).unwrap();
    let output = validate(&[&path], None);
    assert!(!output.status.success(), "{}", report(&output));
}

/// What the README promises of the sidecar manifests, read as YAML: drainit is a native sidecar
/// with `drainit prestop` as its hook (pre-1.29: a regular container without one), the app's hook
/// is `GET /drain/wait` on drainit's port given as a number, and the grace periods agree.
#[test]
fn the_sidecar_manifests_wire_both_hooks() {
    let check = r#"
import sys, yaml
native = sys.argv[1] == "docker/sidecar.yaml"
deployment = next(d for d in yaml.safe_load_all(open(sys.argv[1])) if d["kind"] == "Deployment")
pod = deployment["spec"]["template"]["spec"]
sidecars = pod.get("initContainers", []) if native else pod["containers"]
drainit = next(c for c in sidecars if c["name"] == "drainit")
app = next(c for c in pod["containers"] if c["name"] == "app")
assert drainit["args"] == ["sidecar"], drainit["args"]
if native:
    assert drainit["restartPolicy"] == "Always"
    assert drainit["lifecycle"]["preStop"]["exec"]["command"] == ["/usr/local/bin/drainit", "prestop"]
else:
    assert "lifecycle" not in drainit
hook = app["lifecycle"]["preStop"]["httpGet"]
health = next(p["containerPort"] for p in drainit["ports"] if p["name"] == "health")
assert hook["path"] == "/drain/wait" and type(hook["port"]) is int and hook["port"] == health, hook
env = {e["name"]: e["value"] for e in drainit["env"]}
assert env["DRAINIT_GRACE_PERIOD"] == f'{pod["terminationGracePeriodSeconds"]}s', env
assert drainit["readinessProbe"]["httpGet"]["path"] == "/ready"
"#;
    for manifest in ["docker/sidecar.yaml", "docker/sidecar-pre-1.29.yaml"] {
        let output = Command::new(venv_bin("python"))
            .args(["-c", check, manifest])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert!(output.status.success(), "{manifest}: {}", report(&output));
    }
}
