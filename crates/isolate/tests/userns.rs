//! Sandboxes with a user namespace (`SandboxSpec::user_namespace`): root inside is an
//! unprivileged host uid, the image's files are root's inside, the host's are nobody's,
//! and everything else a sandbox guarantees still holds. Runs as root.

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hutch_isolate::{Egress, IdRange, Rootfs, SandboxInfo, SandboxSpec};
use hutch_net::{NetConfig, NetManager};
use hutch_testkit::sandboxd_request as request;
use hutch_testkit::{eventually, in_private_netns};
use serde_json::json;
use support::image::import;
use support::{TestEnv, artefacts};

/// Docker's default capability set as a bit mask.
const DOCKER_CAPS: u64 = 0xa80425fb;
/// What the kernel shows for an id that has no mapping in the user namespace.
const OVERFLOW_ID: &str = "65534";

fn userns_spec(env: &TestEnv, id: &str) -> SandboxSpec {
    SandboxSpec { user_namespace: true, ..env.spec(id) }
}

/// The `Uid:` and `Gid:` lines of a host process, as `(real, effective, saved, fs)`.
fn host_ids(pid: i32) -> anyhow::Result<(Vec<u32>, Vec<u32>)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<Vec<u32>> {
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .ok_or_else(|| anyhow::anyhow!("no {name} in /proc/{pid}/status"))?;
        Ok(line.split_whitespace().map(str::parse).collect::<Result<_, _>>()?)
    };
    Ok((field("Uid:")?, field("Gid:")?))
}

#[tokio::test]
async fn root_inside_is_an_unprivileged_host_uid() -> anyhow::Result<()> {
    let env = TestEnv::new("userns-ids")?;
    let base = env.driver.user_ids().base();
    assert_eq!(env.driver.user_ids(), IdRange::default());
    let info: SandboxInfo = env.driver.create(userns_spec(&env, "ids")).await?;

    let out = env
        .sh("ids", "sleep 1000 & id -u; id -g; cat /proc/self/uid_map /proc/self/gid_map")
        .await?;
    assert!(out.ok(), "{out:?}");
    let lines: Vec<Vec<&str>> =
        out.stdout.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(lines[0], ["0"], "{out:?}");
    assert_eq!(lines[1], ["0"], "{out:?}");
    let map = ["0".to_owned(), base.to_string(), "65536".to_owned()];
    assert_eq!(lines[2], map, "uid_map: {out:?}");
    assert_eq!(lines[3], map, "gid_map: {out:?}");

    // Seen from the host, every process of the sandbox (sandboxd as PID 1 and the
    // sleep it left running) is host uid `base`, in every one of its ids.
    let pids = env.driver.cgroup(&env.id("ids")).pids()?;
    assert!(pids.contains(&info.pid) && pids.len() >= 2, "{pids:?}");
    for pid in pids {
        let (uids, gids) = host_ids(pid)?;
        assert_eq!(uids, [base; 4], "pid {pid}");
        assert_eq!(gids, [base; 4], "pid {pid}");
    }
    Ok(())
}

/// Opens files for writing without writing a byte (harmless even if isolation were
/// broken) and prints `path errno-name` per probe, then owners as `path uid`.
const HOST_FILES_PROBE: &str = r#"
import errno, os, sys
def probe(path, flags):
    try:
        os.close(os.open(path, flags, 0o644))
        print(path, "opened")
    except OSError as e:
        print(path, errno.errorcode[e.errno])
marker = sys.argv[1]
probe("/usr/bin/python3", os.O_WRONLY | os.O_APPEND)
probe("/.hutch/sandboxd", os.O_WRONLY | os.O_APPEND)
probe("/usr/" + marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
probe("/etc/passwd", os.O_WRONLY | os.O_APPEND)
probe("/etc/" + marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
probe("/tmp/" + marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
for path in ("/usr/bin/python3", "/.hutch/sandboxd", "/etc/passwd", "/etc", "/root", "/tmp"):
    print(path, os.stat(path).st_uid)
"#;

#[tokio::test]
async fn host_files_stay_nobodys_and_unwritable_despite_cap_dac_override() -> anyhow::Result<()> {
    let env = TestEnv::new("userns-host")?;
    env.driver.create(userns_spec(&env, "host")).await?;
    let marker = format!("hutch-probe-{}", std::process::id());
    let out =
        support::exec(&env.socket("host"), "/usr/bin/python3", &["-c", HOST_FILES_PROBE, &marker])
            .await?;
    assert!(out.ok(), "{out:?}");
    let result = |path: &str| after(&out.stdout, &format!("{path} "));
    // Host binaries are host root's, which has no id inside: the kernel refuses the
    // write before even looking at the read-only mount (that would be EROFS), and
    // CAP_DAC_OVERRIDE does not apply to an unmapped owner.
    for path in ["/usr/bin/python3", "/.hutch/sandboxd"] {
        let lines: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with(path)).collect();
        assert_eq!(lines, [format!("{path} EACCES"), format!("{path} {OVERFLOW_ID}")], "{out:?}");
    }
    assert_ne!(result(&format!("/usr/{marker}")), "opened", "{out:?}");
    // The image's own files (the host image's filtered /etc, its /root, the skeleton's
    // /tmp) are root's inside, and root changes them in its own writable layer.
    let etc: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("/etc/passwd")).collect();
    assert_eq!(etc, ["/etc/passwd opened", "/etc/passwd 0"], "{out:?}");
    assert_eq!(result(&format!("/etc/{marker}")), "opened", "{out:?}");
    assert_eq!(result(&format!("/tmp/{marker}")), "opened", "{out:?}");
    assert_eq!(result("/etc"), "0", "{out:?}");
    assert_eq!(result("/root"), "0", "{out:?}");
    assert_eq!(result("/tmp"), "0", "{out:?}");
    assert!(!std::path::Path::new("/usr").join(&marker).exists());
    assert!(!std::path::Path::new("/etc").join(&marker).exists());

    // Root inside holds CAP_DAC_OVERRIDE (bit 1) all along, so the EACCES above is the
    // mapping's doing, not a missing capability.
    let caps = env.sh("host", "grep '^CapEff:' /proc/self/status").await?;
    let eff = u64::from_str_radix(&after(&caps.stdout, "CapEff:"), 16)?;
    assert_ne!(eff & (1 << 1), 0, "{caps:?}");
    Ok(())
}

#[tokio::test]
async fn an_oci_images_files_are_roots_inside_and_root_writes_its_layer() -> anyhow::Result<()> {
    let env = TestEnv::new("userns-oci")?;
    let image = import(
        env.dir.path(),
        "example.com/busybox:userns",
        json!({ "Env": ["PATH=/bin"], "Cmd": ["sh"] }),
    )
    .await?;
    let spec = SandboxSpec {
        user_namespace: true,
        command: None,
        ..SandboxSpec::from_image(env.id("oci"), &image)
    };
    let Rootfs::Layers { lower } = &spec.rootfs else { panic!("{:?}", spec.rootfs) };
    let layers: Vec<PathBuf> = lower.clone();
    env.driver.create(spec).await?;

    let out = env
        .sh(
            "oci",
            "busybox stat -c '%u:%g' /bin /bin/busybox /etc/passwd /; \
             echo 'extra:x:1001:1001::/:/bin/sh' >> /etc/passwd && tail -n 1 /etc/passwd; \
             mkdir /bin/newdir && echo new > /bin/newfile && chown 1000:1000 /bin/newfile \
               && busybox stat -c '%u:%g' /bin/newfile; \
             mkdir /data && echo ok > /data/file && cat /data/file; \
             echo tmp > /tmp/file && cat /tmp/file",
        )
        .await?;
    assert!(out.ok(), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[..4], ["0:0"; 4], "image files must be root's inside: {out:?}");
    assert_eq!(lines[4], "extra:x:1001:1001::/:/bin/sh", "{out:?}");
    assert_eq!(lines[5], "1000:1000", "{out:?}");
    assert_eq!(lines[6..], ["ok", "tmp"], "{out:?}");

    // The layer cache itself is untouched, and owned by host root as before.
    for layer in &layers {
        assert!(!layer.join("bin/newfile").exists() && !layer.join("data").exists());
        let passwd = std::fs::read_to_string(layer.join("etc/passwd"))?;
        assert!(!passwd.contains("extra:"), "{passwd}");
        let meta = std::fs::metadata(layer.join("bin"))?;
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 0);
    }
    Ok(())
}

#[tokio::test]
async fn isolation_holds_with_a_user_namespace() -> anyhow::Result<()> {
    let env = TestEnv::new("userns-iso")?;
    env.driver.create(userns_spec(&env, "iso")).await?;
    let (status, body) = request(&env.socket("iso"), "GET", "/health", None).await?;
    assert_eq!(status, 200, "{body}");

    let out = env
        .sh(
            "iso",
            "grep -E '^(CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status; \
             hostname; ls /proc | grep -cE '^[0-9]+$'; wc -c < /proc/keys; \
             ls /sys/firmware | wc -l; ls /sys/class/net | tr '\\n' ' '; echo; \
             mount -t tmpfs none /mnt 2>/dev/null && echo MOUNTED; \
             echo 1 > /proc/sys/kernel/domainname 2>/dev/null && echo SYSCTL-WRITTEN; \
             echo x > /.hutch/run/probe 2>/dev/null && echo RUN-WRITTEN; \
             python3 -c 'import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); \
               print(\"unshare\", libc.unshare(0x10000000), ctypes.get_errno())'",
        )
        .await?;
    assert!(out.ok(), "{out:?}");
    let field = |name: &str| after(&out.stdout, &format!("{name}:"));
    let mask = |name: &str| u64::from_str_radix(&field(name), 16).unwrap_or(u64::MAX);
    assert_eq!(mask("CapEff"), DOCKER_CAPS, "{out:?}");
    assert_eq!(mask("CapBnd"), DOCKER_CAPS, "{out:?}");
    assert_eq!(mask("CapAmb"), 0, "{out:?}");
    assert_eq!(field("NoNewPrivs"), "1", "{out:?}");
    assert_eq!(field("Seccomp"), "2", "{out:?}");
    let rest: Vec<&str> = out.stdout.lines().skip(5).collect();
    assert_eq!(rest[0], "iso", "hostname: {out:?}");
    // sandboxd, sh, ls, grep: no host process.
    assert!(rest[1].trim().parse::<u32>()? < 10, "{out:?}");
    assert_eq!(rest[2].trim(), "0", "/proc/keys must read empty: {out:?}");
    assert_eq!(rest[3].trim(), "0", "/sys/firmware must be empty: {out:?}");
    assert_eq!(rest[4].trim(), "lo", "{out:?}");
    for refused in ["MOUNTED", "SYSCTL-WRITTEN", "RUN-WRITTEN"] {
        assert!(!out.stdout.contains(refused), "{out:?}");
    }
    // A nested user namespace is refused by the filter, not just the kernel.
    assert_eq!(rest.last().copied(), Some("unshare -1 1"), "{out:?}");
    Ok(())
}

/// Python serving `hi` on 0.0.0.0:8080 to every connection, in the background.
const SERVE_HI: &str = "python3 -c 'import socket\ns = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind((\"0.0.0.0\", 8080)); s.listen()\nwhile True:\n    c, _ = s.accept(); c.sendall(b\"hi\"); c.close()' >/dev/null 2>&1 &";

#[test]
fn the_host_reaches_a_userns_sandbox_over_its_veth_and_connect_port() {
    in_private_netns(
        "the_host_reaches_a_userns_sandbox_over_its_veth_and_connect_port",
        || async {
            let net_dir = tempfile::tempdir()?;
            let network = Arc::new(NetManager::new(NetConfig::new(net_dir.path())).await?);
            let env = TestEnv::with_network("userns-net", network)?;
            // The veth is moved into a network namespace that the sandbox's user namespace
            // owns; the host still wires it and reaches the sandbox's address.
            let spec = SandboxSpec { egress: Egress::Internet, ..userns_spec(&env, "net") };
            let address = env.driver.create(spec).await?.address.expect("an address");
            let out = env.sh("net", SERVE_HI).await?;
            assert!(out.ok(), "{out:?}");
            let read_hi = |mut stream: std::net::TcpStream| -> anyhow::Result<String> {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut stream, &mut text)?;
                Ok(text)
            };
            let reached = eventually(Duration::from_secs(10), async || {
                std::net::TcpStream::connect((address, 8080))
                    .ok()
                    .and_then(|s| read_hi(s).ok())
                    .is_some_and(|text| text == "hi")
            })
            .await;
            assert!(reached, "the host cannot reach {address}:8080");

            // connect_port enters the namespace from a host thread.
            let mut stream = env
                .driver
                .connect_port(&env.id("net"), 8080, std::time::Duration::from_secs(5))
                .await?;
            let mut text = String::new();
            tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut text).await?;
            assert_eq!(text, "hi");
            env.driver.destroy(&env.id("net")).await?;
            Ok(())
        },
    );
}

#[tokio::test]
async fn twenty_userns_create_destroy_cycles_leave_nothing_behind() -> anyhow::Result<()> {
    let env = TestEnv::new("userns-leak")?;
    let before = artefacts(&env);
    for i in 0..20 {
        let id = env.id(&format!("userns-{}", i % 2));
        env.driver.create(userns_spec(&env, id.as_str())).await?;
        env.driver.destroy(&id).await?;
    }
    assert_eq!(artefacts(&env), before);
    Ok(())
}

#[tokio::test]
async fn a_new_driver_adopts_a_live_userns_sandbox_and_sweeps_a_dead_one() -> anyhow::Result<()> {
    let env = TestEnv::new("userns-adopt")?;
    let before = artefacts(&env);
    env.driver.create(userns_spec(&env, "alive")).await?;
    let dead = env.driver.create(userns_spec(&env, "ghost")).await?;
    // PID 1 of one dies behind the driver's back.
    // SAFETY: kill(2) of the sandbox init this test created.
    assert_eq!(unsafe { libc::kill(dead.pid, libc::SIGKILL) }, 0);
    let cgroup = env.driver.cgroup(&env.id("ghost"));
    assert!(
        eventually(Duration::from_secs(5), async || cgroup.pids().is_ok_and(|p| p.is_empty()))
            .await
    );

    // A new driver over the same directories, as after a restart.
    let driver = env.reopen()?;
    let report = driver.adopt().await?;
    assert_eq!(report.adopted, vec![env.id("alive")]);
    assert_eq!(report.removed, vec!["ghost".to_owned()]);
    let (status, _) =
        request(&driver.sandboxd_socket(&env.id("alive")), "GET", "/health", None).await?;
    assert_eq!(status, 200);
    driver.destroy(&env.id("alive")).await?;
    assert_eq!(artefacts(&env), before);
    Ok(())
}

#[tokio::test]
async fn a_failing_userns_child_reports_its_step_and_leaves_nothing() -> anyhow::Result<()> {
    let env = TestEnv::new("userns-fail")?;
    let before = artefacts(&env);
    // A file cannot be the working directory.
    let spec = SandboxSpec { working_dir: Some("/etc/passwd".into()), ..userns_spec(&env, "bad") };
    let err = env.driver.create(spec).await.unwrap_err();
    let hutch_isolate::CreateSandboxError::Child { step, source } = &err else { panic!("{err:?}") };
    assert_eq!(step, "Chdir");
    assert_eq!(source.raw_os_error(), Some(libc::ENOTDIR));
    assert_eq!(artefacts(&env), before);
    Ok(())
}

/// The rest of the first line of `text` that starts with `prefix`, trimmed; empty if
/// none does.
fn after(text: &str, prefix: &str) -> String {
    text.lines().find_map(|l| l.strip_prefix(prefix)).unwrap_or_default().trim().to_owned()
}

#[tokio::test]
async fn opaque_directories_and_whiteouts_of_image_layers_hold_in_a_user_namespace()
-> anyhow::Result<()> {
    let env = TestEnv::new("userns-whiteout")?;
    let layers = tempfile::tempdir()?;
    let (bottom, top) = (layers.path().join("bottom"), layers.path().join("top"));
    hutch_testkit::busybox_rootfs(&bottom, &["sh", "ls", "cat", "echo", "tr"])?;
    // The upper layer as a registry would ship it, unpacked by hutch-image itself:
    // `/data` opaque (hiding the bottom's `a`) and `/gone` whited out.
    let bottom_extra = hutch_testkit::LayerBuilder::new()
        .dir("data", 0o755)
        .file("data/a", b"bottom", 0o644)
        .file("gone", b"bottom", 0o644)
        .tar();
    hutch_image::extract::unpack_layer(&bottom_extra[..], &bottom)?;
    let top_layer = hutch_testkit::LayerBuilder::new()
        .dir("data", 0o755)
        .file("data/.wh..wh..opq", b"", 0o644)
        .file("data/b", b"top", 0o644)
        .file(".wh.gone", b"", 0o644)
        .tar();
    std::fs::create_dir(&top)?;
    hutch_image::extract::unpack_layer(&top_layer[..], &top)?;

    for (id, user_namespace) in [("plain", false), ("userns", true)] {
        let mut spec = env.spec(id);
        spec.rootfs = Rootfs::Layers { lower: vec![bottom.clone(), top.clone()] };
        spec.user_namespace = user_namespace;
        env.driver.create(spec).await?;
        let out = env.sh(id, "ls /data | tr '\\n' ' '; echo; ls /gone 2>&1 || echo absent").await?;
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert_eq!(lines.first().map(|l| l.trim()), Some("b"), "{id}: {out:?}");
        assert_eq!(lines.last(), Some(&"absent"), "{id}: {out:?}");
        env.driver.destroy(&env.id(id)).await?;
    }
    Ok(())
}
