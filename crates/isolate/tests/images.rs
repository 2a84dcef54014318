//! Sandboxes from OCI images: the image's rootfs, Env, WorkingDir, User and
//! Entrypoint + Cmd applied. Runs as root; the image is built by the test from
//! busybox-static's /bin/busybox and imported as an OCI image-layout tarball.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use hutch_isolate::{CreateSandboxError, SandboxId, SandboxSpec};
use hutch_testkit::Registry;
use hutch_testkit::sandboxd_request as request;
use oci_client::client::ImageLayer;
use oci_client::secrets::RegistryAuth::Anonymous;
use serde_json::json;
use support::TestEnv;
use support::image::import;

fn app_config(cmd: Option<serde_json::Value>) -> serde_json::Value {
    let mut config = json!({
        "Env": ["FOO=bar", "PATH=/bin"],
        "WorkingDir": "/work",
        "User": "1000:1000",
    });
    if let Some(cmd) = cmd {
        config["Cmd"] = cmd;
    }
    config
}

#[tokio::test]
async fn sandbox_from_an_image_runs_its_command_with_its_config() -> anyhow::Result<()> {
    let env = TestEnv::new("image-run")?;
    let image = import(
        env.dir.path(),
        "example.com/busybox:app",
        app_config(Some(json!(["sh", "-c", "echo started > /tmp/main-ran; exec sleep 1000"]))),
    )
    .await?;
    let id = SandboxId::new("image-run")?;
    let spec = SandboxSpec::from_image(id.clone(), &image);
    assert_eq!(
        spec.command,
        Some(
            ["sh", "-c", "echo started > /tmp/main-ran; exec sleep 1000"]
                .map(String::from)
                .to_vec()
        )
    );
    env.driver.create(spec).await?;

    // Env, WorkingDir (created, as Docker does) and User reach processes sandboxd starts.
    let out = env.sh("image-run", "echo $FOO; pwd; id -u; id -g").await?;
    assert!(out.ok(), "{out:?}");
    assert_eq!(out.stdout, "bar\n/work\n1000\n1000\n");

    // The main command runs, tagged `main`, as the image's user.
    let (status, body) = request(&env.socket("image-run"), "GET", "/processes/main", None).await?;
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(info["status"], "running", "{body}");
    assert_eq!(info["command"], "sh", "{body}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = env.sh("image-run", "cat /tmp/main-ran && id -u").await?;
        if out.ok() {
            assert_eq!(out.stdout, "started\n1000\n");
            break;
        }
        assert!(Instant::now() < deadline, "main never wrote /tmp/main-ran: {out:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The root is the image's, not the host's: busybox has no /usr at all.
    assert!(Path::new("/usr/bin").is_dir());
    let out = env.sh("image-run", "test -e /usr/bin || test -e /usr; echo $?; ls /").await?;
    assert!(out.stdout.starts_with("1\n"), "{out:?}");
    assert!(!out.stdout.lines().any(|l| l == "usr" || l == "home"), "{out:?}");
    assert!(out.stdout.lines().any(|l| l == "work"), "{out:?}");

    env.driver.destroy(&id).await?;
    Ok(())
}

#[tokio::test]
async fn caller_env_overrides_the_image_env() -> anyhow::Result<()> {
    let env = TestEnv::new("image-env")?;
    let image = import(env.dir.path(), "example.com/busybox:env", app_config(None)).await?;
    let id = SandboxId::new("image-env")?;
    let mut spec = SandboxSpec::from_image(id.clone(), &image);
    assert_eq!(spec.command, None, "an image without Cmd or Entrypoint gives an idle sandbox");
    spec.set_env("FOO", "caller");
    spec.user = None;
    env.driver.create(spec).await?;

    let out = env.sh("image-env", "echo $FOO $PATH; id -u").await?;
    assert_eq!(out.stdout, "caller /bin\n0\n", "{out:?}");
    let (status, _) = request(&env.socket("image-env"), "GET", "/processes/main", None).await?;
    assert_eq!(status, 404, "an idle sandbox has no main process");
    env.driver.destroy(&id).await?;
    Ok(())
}

#[tokio::test]
async fn image_whose_command_does_not_exist_fails_create_and_leaves_nothing() -> anyhow::Result<()>
{
    let env = TestEnv::new("image-bad")?;
    let image = import(
        env.dir.path(),
        "example.com/busybox:bad",
        app_config(Some(json!(["/bin/no-such-program", "--flag"]))),
    )
    .await?;
    let id = SandboxId::new("image-bad")?;
    let err = env
        .driver
        .create(SandboxSpec::from_image(id.clone(), &image))
        .await
        .expect_err("a sandbox whose command cannot start must not be created");
    assert!(matches!(err, CreateSandboxError::SandboxdExited { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("/bin/no-such-program"), "{message}");

    assert!(env.driver.inspect(&id).is_err());
    let run: Vec<_> = std::fs::read_dir(env.dir.path().join("run"))?.collect();
    assert!(run.is_empty(), "run dir not empty: {run:?}");
    assert_eq!(env.driver.cgroup_layout().existing_ids(), Vec::<String>::new());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_pulled_from_a_registry_runs_end_to_end() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let reference = registry.reference("test/busybox:1");
    let layer = hutch_testkit::busybox_layer()?;
    let config = hutch_testkit::image_config(
        &layer,
        app_config(Some(json!(["sh", "-c", "echo $FOO > /tmp/main-ran; exec sleep 1000"]))),
    )?;
    registry.push("test/busybox:1", &[ImageLayer::oci_v1(layer, None)], config, &Anonymous).await?;

    let env = TestEnv::new("image-pull")?;
    let store = hutch_image::ImageStore::open(env.dir.path().join("images"))?;
    let options = hutch_image::PullOptions {
        insecure_registries: vec![registry.addr.clone()],
        ..hutch_image::PullOptions::default()
    };
    let image = store.pull(&reference, hutch_image::RegistryAuth::Anonymous, options, None).await?;
    let id = SandboxId::new("image-pull")?;
    env.driver.create(SandboxSpec::from_image(id.clone(), &image)).await?;

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = env.sh("image-pull", "cat /tmp/main-ran; pwd; id -u").await?;
        if out.ok() {
            assert_eq!(out.stdout, "bar\n/work\n1000\n");
            break;
        }
        assert!(Instant::now() < deadline, "main never wrote /tmp/main-ran: {out:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.driver.destroy(&id).await?;
    Ok(())
}
