//! What code inside a sandbox can and cannot do. Runs as root.

mod support;

use std::time::Duration;

use support::{TestEnv, request};

/// Docker's default capability set as a bit mask.
const DOCKER_CAPS: u64 = 0xa80425fb;

#[tokio::test]
async fn sandboxd_is_pid_1_and_runs_debian_python_from_the_host_image() -> anyhow::Result<()> {
    let env = TestEnv::new("python")?;
    let info = env.driver.create(env.spec("py")).await?;
    assert_eq!(info.state, hutch_isolate::SandboxState::Running);

    let (status, body) = request(&env.socket("py"), "GET", "/health", None).await?;
    assert_eq!(status, 200, "{body}");

    let out = env
        .sh("py", "cat /proc/1/cmdline | tr '\\0' ' '; echo; hostname; python3 -c 'import ssl, json; print(json.dumps(1 + 1))'")
        .await?;
    assert!(out.ok(), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[0].starts_with("/.hutch/sandboxd "), "{out:?}");
    assert_eq!(lines[1], "py");
    assert_eq!(lines[2], "2");
    Ok(())
}

#[tokio::test]
async fn host_processes_are_invisible() -> anyhow::Result<()> {
    let env = TestEnv::new("pids")?;
    env.driver.create(env.spec("pids")).await?;
    let out = env.sh("pids", "ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' '").await?;
    assert!(out.ok(), "{out:?}");
    let pids: Vec<u32> = out.stdout.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
    // sandboxd, the shell, ls, grep, sort, tr: nothing of the host.
    assert_eq!(pids.first(), Some(&1));
    assert!(pids.len() < 10, "{pids:?}");
    assert!(!pids.contains(&std::process::id()) || std::process::id() < 10);
    Ok(())
}

#[tokio::test]
async fn host_filesystem_cannot_be_written_and_secrets_are_absent() -> anyhow::Result<()> {
    let env = TestEnv::new("fs")?;
    env.driver.create(env.spec("fs")).await?;
    let marker = format!("hutch-probe-{}", std::process::id());
    let out = env
        .sh(
            "fs",
            &format!(
                "for p in /usr/{marker} /usr/bin/{marker} /.hutch/sandboxd /.hutch/run/{marker} /.hutch/run/sandboxd.sock; do \
                   if echo x > $p 2>/dev/null; then echo WROTE $p; fi; done; \
                 rm -f /.hutch/run/sandboxd.sock 2>/dev/null; ln -s /x /.hutch/run/link 2>/dev/null; \
                 [ -S /.hutch/run/sandboxd.sock ] || echo WROTE socket-removed; \
                 [ -L /.hutch/run/link ] && echo WROTE link; \
                 echo x > /etc/{marker} && echo etc-upper-ok; \
                 for f in /etc/shadow /etc/machine-id /etc/ssh /root/.bash_history /home /var/lib/dpkg; do \
                   [ -e $f ] && [ -n \"$(ls -A $f 2>/dev/null)\" -o -f $f ] && echo PRESENT $f; done; \
                 mknod /tmp/sda b 8 0 && (head -c 1 /tmp/sda >/dev/null 2>&1 && echo DEVICE-READABLE); true"
            ),
        )
        .await?;
    assert!(out.ok(), "{out:?}");
    assert!(!out.stdout.contains("WROTE"), "{out:?}");
    assert!(!out.stdout.contains("PRESENT"), "{out:?}");
    assert!(!out.stdout.contains("DEVICE-READABLE"), "{out:?}");
    // Writes land in the sandbox's own layer, never on the host.
    assert!(out.stdout.contains("etc-upper-ok"), "{out:?}");
    assert!(!std::path::Path::new("/etc").join(&marker).exists());
    assert!(!std::path::Path::new("/usr").join(&marker).exists());
    Ok(())
}

/// Probes dangerous syscalls with ctypes and prints `name errno` for each.
const SYSCALL_PROBE: &str = r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def probe(name, nr, *args):
    ctypes.set_errno(0)
    ret = libc.syscall(nr, *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    print(name, ret, ctypes.get_errno())
probe("mount", 165, b"none", b"/tmp", b"tmpfs", 0, None)
probe("umount2", 166, b"/proc", 2)
probe("unshare_user", 272, 0x10000000)
probe("unshare_mnt", 272, 0x00020000)
probe("clone_newns", 56, 0x00020000 | 17, 0, 0, 0, 0)
probe("setns", 308, 0, 0)
probe("keyctl", 250, 0, 0, 0, 0, 0)
probe("add_key", 248, b"user", b"k", b"v", 1, -2)
probe("bpf", 321, 0, 0, 0)
probe("ptrace_traceme", 101, 0, 0, 0, 0)
probe("ptrace_attach", 101, 16, 1, 0, 0)
probe("pivot_root", 155, b"/", b"/")
probe("perf_event_open", 298, 0, 0, -1, -1, 0)
probe("userfaultfd", 323, 0)
probe("open_by_handle_at", 304, 0, 0, 0)
probe("kexec_load", 246, 0, 0, 0, 0)
probe("init_module", 175, 0, 0, 0)
probe("reboot_bad_magic", 169, 0, 0, 0, 0)
probe("swapon", 167, b"/nonexistent", 0)
probe("settimeofday", 164, 0, 0)
probe("clock_settime", 227, 0, 0)
probe("acct", 163, 0)
probe("fsopen", 430, b"tmpfs", 0)
probe("open_tree", 428, -100, b"/", 0)
probe("personality_bad", 135, 0x0040000)
probe("io_uring_setup", 425, 1, 0)
probe("x32_getpid", 0x40000000 + 39)
probe("clone3", 435, 0, 0)
"#;

#[tokio::test]
async fn dangerous_syscalls_are_refused() -> anyhow::Result<()> {
    let env = TestEnv::new("syscalls")?;
    env.driver.create(env.spec("sys")).await?;
    let out = support::exec(&env.socket("sys"), "/usr/bin/python3", &["-c", SYSCALL_PROBE]).await?;
    assert!(out.ok(), "{out:?}");
    let mut seen = 0;
    for line in out.stdout.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, ret, errno] = fields[..] else { panic!("bad probe line {line:?}") };
        assert_eq!(ret, "-1", "{name} succeeded: {line}");
        let expected = if name == "clone3" { "38" } else { "1" };
        assert_eq!(errno, expected, "{name} failed with errno {errno}, not the filter's");
        seen += 1;
    }
    assert_eq!(seen, 28, "{out:?}");

    // Mounting through the mount(8) binary fails too.
    let out = env.sh("sys", "mount -t tmpfs none /mnt").await?;
    assert!(!out.ok(), "{out:?}");
    Ok(())
}

#[tokio::test]
async fn privileges_are_reduced_to_dockers_defaults() -> anyhow::Result<()> {
    let env = TestEnv::new("caps")?;
    env.driver.create(env.spec("caps")).await?;
    let out = env
        .sh(
            "caps",
            "grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status",
        )
        .await?;
    assert!(out.ok(), "{out:?}");
    let field = |name: &str| {
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned()
    };
    let mask = |name: &str| u64::from_str_radix(&field(name), 16).unwrap_or(u64::MAX);
    assert_eq!(mask("CapBnd"), DOCKER_CAPS, "{out:?}");
    assert_eq!(mask("CapEff"), DOCKER_CAPS, "{out:?}");
    assert_eq!(mask("CapPrm"), DOCKER_CAPS, "{out:?}");
    assert_eq!(mask("CapAmb"), 0, "{out:?}");
    assert_eq!(field("NoNewPrivs"), "1");
    assert_eq!(field("Seccomp"), "2");
    Ok(())
}

#[tokio::test]
async fn proc_is_masked_and_partly_read_only() -> anyhow::Result<()> {
    let env = TestEnv::new("proc")?;
    env.driver.create(env.spec("proc")).await?;
    let out = env
        .sh(
            "proc",
            "wc -c < /proc/keys; ls /sys/firmware | wc -l; \
             echo 1 > /proc/sys/kernel/domainname 2>/dev/null && echo SYSCTL-WRITTEN; \
             echo h > /proc/sysrq-trigger 2>/dev/null && echo SYSRQ; \
             ls /sys/class/net | tr '\\n' ' '; echo; \
             readlink /dev/ptmx; ls /dev | tr '\\n' ' '",
        )
        .await?;
    assert!(out.ok(), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0].trim(), "0", "/proc/keys must read empty: {out:?}");
    assert_eq!(lines[1].trim(), "0", "/sys/firmware must be empty: {out:?}");
    assert!(!out.stdout.contains("SYSCTL-WRITTEN"), "{out:?}");
    assert!(!out.stdout.contains("SYSRQ"), "{out:?}");
    // egress none: loopback only.
    assert_eq!(lines[2].trim(), "lo", "{out:?}");
    assert_eq!(lines[3], "pts/ptmx");
    for dev in ["null", "zero", "full", "random", "urandom", "tty", "pts", "shm"] {
        assert!(lines[4].split_whitespace().any(|d| d == dev), "no /dev/{dev}: {out:?}");
    }
    Ok(())
}

#[tokio::test]
async fn egress_none_reaches_nothing_but_loopback() -> anyhow::Result<()> {
    let env = TestEnv::new("egress")?;
    env.driver.create(env.spec("net")).await?;
    // Connect to an address no host route would ever hand to a test: TEST-NET-1.
    let probe = r#"
import socket, errno
s = socket.socket()
s.settimeout(2)
try:
    s.connect(("192.0.2.1", 80)); print("connected")
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno))
"#;
    let out = support::exec(&env.socket("net"), "/usr/bin/python3", &["-c", probe]).await?;
    assert_eq!(out.stdout.trim(), "ENETUNREACH", "{out:?}");
    Ok(())
}

#[tokio::test]
async fn connect_port_reaches_a_loopback_listener_inside() -> anyhow::Result<()> {
    let env = TestEnv::new("port")?;
    env.driver.create(env.spec("port")).await?;
    let server = r#"
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8080)); s.listen()
c, _ = s.accept(); c.sendall(b"hello from inside"); c.close()
"#;
    let script = format!("python3 -c '{server}' >/dev/null 2>&1 &");
    let out = env.sh("port", &script).await?;
    assert!(out.ok(), "{out:?}");

    let id = env.id("port");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match env.driver.connect_port(&id, 8080).await {
            Ok(stream) => break stream,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let mut text = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut text).await?;
    assert_eq!(text, "hello from inside");

    // The same port is not reachable from the host's own namespace.
    assert!(std::net::TcpStream::connect(("127.0.0.1", 8080)).is_err() || port_is_used_on_host());
    Ok(())
}

/// Whether something on the host itself listens on 8080 (then the check above says
/// nothing about isolation, but must not fail the test).
fn port_is_used_on_host() -> bool {
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|t| t.contains(":1F90 "))
}

#[tokio::test]
async fn layers_image_is_stacked_read_only_beneath_a_private_upper() -> anyhow::Result<()> {
    let env = TestEnv::new("layers")?;
    let layers = tempfile::tempdir()?;
    let bottom = layers.path().join("bottom");
    let top = layers.path().join("top");
    std::fs::create_dir_all(bottom.join("bin"))?;
    std::fs::create_dir_all(bottom.join("data"))?;
    std::fs::create_dir_all(top.join("data"))?;
    std::fs::copy("/bin/busybox", bottom.join("bin/busybox"))?;
    for tool in ["sh", "cat", "ls", "echo"] {
        std::os::unix::fs::symlink("busybox", bottom.join("bin").join(tool))?;
    }
    std::fs::write(bottom.join("data/a"), "bottom")?;
    std::fs::write(bottom.join("data/b"), "bottom")?;
    std::fs::write(top.join("data/a"), "top")?;

    let mut spec = env.spec("layers");
    spec.rootfs = hutch_isolate::Rootfs::Layers { lower: vec![bottom.clone(), top.clone()] };
    env.driver.create(spec).await?;
    let out = env
        .sh(
            "layers",
            "cat /data/a; echo; cat /data/b; echo; ls / | tr '\\n' ' '; echo; \
             echo changed > /data/b; echo new > /data/c; cat /data/b",
        )
        .await?;
    assert!(out.ok(), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], "top", "{out:?}");
    assert_eq!(lines[1], "bottom", "{out:?}");
    // Only the layers and the driver's mount points: nothing of the host.
    let entries: Vec<&str> = lines[2].split_whitespace().collect();
    assert!(!entries.contains(&"usr") && !entries.contains(&"etc"), "{out:?}");
    assert!(entries.contains(&"data") && entries.contains(&"proc"), "{out:?}");
    assert_eq!(lines[3], "changed");
    // The layer directories themselves are untouched.
    assert_eq!(std::fs::read_to_string(bottom.join("data/b"))?, "bottom");
    assert!(!bottom.join("data/c").exists() && !top.join("data/c").exists());
    Ok(())
}
