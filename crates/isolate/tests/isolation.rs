//! What code inside a sandbox can and cannot do. Runs as root.

mod support;

use std::time::Duration;

use hutch_testkit::sandboxd_request as request;
use support::TestEnv;

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
                "for p in /usr/{marker} /usr/bin/{marker} /.hutch/sandboxd; do \
                   if echo x > $p 2>/dev/null; then echo WROTE $p; fi; done; \
                 echo x > /etc/{marker} && echo etc-upper-ok; \
                 for f in /etc/shadow /etc/machine-id /etc/ssh /root/.bash_history /home /var/lib/dpkg \
                          /etc/ssl/private /etc/environment /etc/sudoers /etc/hostname; do \
                   [ -e $f ] && [ -n \"$(ls -A $f 2>/dev/null)\" -o -f $f ] && echo PRESENT $f; done; \
                 awk -F: '$3 >= 1000 && $3 != 65534 {{print \"PRESENT user\", $1}}' /etc/passwd; \
                 grep -rl 'PRIVATE KEY' /etc 2>/dev/null | sed 's/^/PRESENT key /'; \
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
    let out = support::exec(
        &env.socket("sys"),
        "/usr/bin/python3",
        &["-c", &probe_script(SYSCALL_PROBE)],
    )
    .await?;
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

/// Probes syscalls that Docker's allow-list leaves out (or that this crate refuses on
/// top of it) and prints `name ret errno` for each. The arguments are chosen so that a
/// call the filter wrongly let through fails in the kernel with another errno, or does
/// nothing harmful.
const OUTSIDE_ALLOW_LIST_PROBE: &str = r#"
probe("name_to_handle_at", 303, -100, b"/", None, None, 0)
# Also needs CAP_SYS_BOOT, which the kernel checks after the filter.
probe("kexec_file_load", 320, -1, -1, 0, None, 0)
probe("uselib", 134, None)
probe("ustat", 136, 0, None)
probe("sysfs", 139, 3)
probe("lookup_dcookie", 212, 0, None, 0)
probe("sysctl", 156, None)
probe("iopl_0", 172, 0)
me = os.getpid()
probe("kcmp_self", 312, me, me, 0, 0, 0)
probe("pidfd_getfd", 438, -1, -1, 0)
probe("process_madvise", 440, -1, None, 0, 0, 0)
probe("process_vm_readv_self", 310, me, None, 0, None, 0, 0)
probe("statmount", 457, None, None, 0, 0)
probe("listmount", 458, None, None, 0, 0)
probe("lsm_set_self_attr", 460, 0, None, 0, 0)
probe("open_tree_attr", 467, -100, b"/", 0, None, 0)
probe("mseal", 462, 0, 0, 0)
# CLONE_SIGHAND without CLONE_VM is EINVAL in the kernel: only the filter gives EPERM.
probe("clone_newuser", 56, 0x10000000 | 0x800 | 17, 0, 0, 0, 0)
probe("clone_newnet", 56, 0x40000000 | 0x800 | 17, 0, 0, 0, 0)
probe("clone_newpid", 56, 0x20000000 | 0x800 | 17, 0, 0, 0, 0)
probe("clone_newns_high_bits", 56, (1 << 40) | 0x00020000 | 0x800 | 17, 0, 0, 0, 0)
probe("socket_vsock", 41, 40, 1, 0)
# AF_ALG: the kernel crypto API, whose algif_aead wrote page cache (CVE-2026-31431).
probe("socket_alg", 41, 38, 5, 0)
probe("socket_tipc", 41, 30, 2, 0)
probe("socket_rds", 41, 21, 5, 0)
probe("socket_bluetooth", 41, 31, 3, 0)
probe("socketpair_tipc", 53, 30, 2, 0, ctypes.create_string_buffer(8))
probe("personality_no_randomize", 135, 0x0040000)
probe("personality_read_implies_exec", 135, 0x0400000)
probe("beyond_the_table", 1000)
probe("x32_read", 0x40000000 + 0, 0, None, 0)
"#;

#[tokio::test]
async fn syscalls_outside_dockers_allow_list_fail_with_eperm() -> anyhow::Result<()> {
    let env = TestEnv::new("allowlist")?;
    env.driver.create(env.spec("allow")).await?;
    let out = support::exec(
        &env.socket("allow"),
        "/usr/bin/python3",
        &["-c", &probe_script(OUTSIDE_ALLOW_LIST_PROBE)],
    )
    .await?;
    assert!(out.ok(), "{out:?}");
    let mut seen = 0;
    for line in out.stdout.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, ret, errno] = fields[..] else { panic!("bad probe line {line:?}") };
        // EPERM even for a number no kernel knows (ENOSYS otherwise): default-deny.
        assert_eq!((ret, errno), ("-1", "1"), "{name} was not refused by the filter: {line}");
        seen += 1;
    }
    assert_eq!(seen, 31, "{out:?}");
    Ok(())
}

/// Makes an i386 `getpid` through `int 0x80` from a 64-bit process; prints the pid if
/// the call returns. Core dumps are disabled first: the kill would otherwise dump.
const I386_PROBE: &str = r#"
import ctypes, mmap
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
code = b"\xb8\x14\x00\x00\x00\xcd\x80\xc3"  # mov eax, 20; int 0x80; ret
buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
buf.write(code)
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
print("i386_getpid", ctypes.CFUNCTYPE(ctypes.c_int)(addr)(), flush=True)
"#;

#[tokio::test]
async fn the_i386_calling_convention_kills_the_process() -> anyhow::Result<()> {
    let env = TestEnv::new("i386")?;
    env.driver.create(env.spec("i386")).await?;
    let out = support::exec(&env.socket("i386"), "/usr/bin/python3", &["-c", I386_PROBE]).await?;
    assert_eq!(out.signal, Some(libc::SIGSYS.into()), "{out:?}");
    assert!(!out.stdout.contains("i386_getpid"), "{out:?}");
    Ok(())
}

/// Calls the conditional and capability-gated syscalls of Docker's profile in the forms
/// it admits, and prints `name ret errno` for each.
const ADMITTED_FORMS_PROBE: &str = r#"
probe("personality_query", 135, 0xffffffff)
probe("personality_linux32", 135, 0x0008)
probe("personality_uname26", 135, 0x20000)
probe("personality_linux", 135, 0x0)
for family in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK, socket.AF_PACKET):
    probe("socket_%d" % family, 41, family, socket.SOCK_DGRAM, 0)
probe("socketpair_unix", 53, socket.AF_UNIX, socket.SOCK_STREAM, 0, ctypes.create_string_buffer(8))
probe("chroot_same_root", 161, b"/")
timex = ctypes.create_string_buffer(256)
probe("clock_adjtime_read", 305, 0, timex)
open("/tmp/probe", "w").close()
probe("fchmodat2", 452, -100, b"/tmp/probe", 0o600, 0)
probe("getxattrat", 464, -100, b"/tmp/probe", 0, None, None, 0)
pid = os.fork()
if pid == 0:
    os._exit(7)
print("fork", os.waitpid(pid, 0)[1] >> 8, 0)
"#;

#[tokio::test]
async fn dockers_conditional_rules_admit_the_harmless_forms() -> anyhow::Result<()> {
    let env = TestEnv::new("admitted")?;
    env.driver.create(env.spec("adm")).await?;
    let out = support::exec(
        &env.socket("adm"),
        "/usr/bin/python3",
        &["-c", &probe_script(ADMITTED_FORMS_PROBE)],
    )
    .await?;
    assert!(out.ok(), "{out:?}");
    let mut seen = 0;
    for line in out.stdout.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, ret, errno] = fields[..] else { panic!("bad probe line {line:?}") };
        match name {
            // getxattrat with a NULL struct xattr_args: the kernel answers, not the filter.
            "getxattrat" => assert_ne!(errno, "1", "{line}"),
            "fork" => assert_eq!(ret, "7", "{line}"),
            _ => assert!(ret != "-1" && errno == "0", "{name} was refused: {line}"),
        }
        seen += 1;
    }
    assert_eq!(seen, 15, "{out:?}");
    Ok(())
}

/// A Python workload touching what real programs use: TLS setup, threads, processes
/// (clone3 falls back to clone), asyncio and a socket server on loopback.
const PYTHON_WORKLOAD: &str = r#"
import asyncio, multiprocessing, os, socket, socketserver, ssl, subprocess, threading
ctx = ssl.create_default_context()
assert ctx.verify_mode == ssl.CERT_REQUIRED
assert subprocess.run(["sh", "-c", "echo child"], capture_output=True).stdout == b"child\n"
results = []
threads = [threading.Thread(target=lambda i=i: results.append(i * i)) for i in range(8)]
for t in threads: t.start()
for t in threads: t.join()
assert sorted(results) == [i * i for i in range(8)]
with multiprocessing.Pool(2) as pool:
    assert pool.map(abs, [-1, -2, -3]) == [1, 2, 3]

class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(self.request.recv(64).upper())
with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo) as server:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.create_connection(server.server_address, timeout=5) as c:
        c.sendall(b"threaded")
        assert c.recv(64) == b"THREADED"
    server.shutdown()

async def main():
    async def handle(reader, writer):
        writer.write((await reader.readline()).upper())
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"async\n")
    line = await reader.readline()
    writer.close()
    server.close()
    await server.wait_closed()
    proc = await asyncio.create_subprocess_exec("true")
    return line, await proc.wait()
assert asyncio.run(main()) == (b"ASYNC\n", 0)
print("workload ok")
"#;

#[tokio::test]
async fn python_threads_processes_asyncio_and_sockets_work() -> anyhow::Result<()> {
    let env = TestEnv::new("workload")?;
    env.driver.create(env.spec("work")).await?;
    let out =
        support::exec(&env.socket("work"), "/usr/bin/python3", &["-c", PYTHON_WORKLOAD]).await?;
    assert!(out.ok(), "{out:?}");
    assert_eq!(out.stdout.trim(), "workload ok", "{out:?}");
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
async fn pooled_network_namespaces_are_fresh_private_and_have_loopback() -> anyhow::Result<()> {
    let env = TestEnv::with_netns_pool("netns-pool", 2)?;
    env.driver.create(env.spec("pooled-a")).await?;
    env.driver.create(env.spec("pooled-b")).await?;
    assert_eq!(env.driver.netns_pool().map(|stats| stats.taken), Some(2));
    // Without the pool, for comparison: a namespace of the clone's own.
    let plain = TestEnv::new("netns-plain")?;
    plain.driver.create(plain.spec("plain")).await?;

    // Each sandbox has a namespace of its own, none of them the host's, with
    // nothing but `lo`, which is up and carries traffic.
    let probe = r#"
import os, socket
print(os.readlink("/proc/self/ns/net"))
print(sorted(line.split(":")[0].strip() for line in open("/proc/net/dev").readlines()[2:]))
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
c = socket.create_connection(s.getsockname(), timeout=2); print("loopback ok")
try:
    socket.create_connection(("192.0.2.1", 80), timeout=2); print("connected")
except OSError as e:
    print(e.errno)
"#;
    let mut namespaces = vec![std::fs::read_link("/proc/self/ns/net")?.display().to_string()];
    for (env, id) in [(&env, "pooled-a"), (&env, "pooled-b"), (&plain, "plain")] {
        let out = support::exec(&env.socket(id), "/usr/bin/python3", &["-c", probe]).await?;
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert_eq!(lines.get(1..), Some(&["['lo']", "loopback ok", "101"][..]), "{id}: {out:?}");
        namespaces.push(lines[0].to_owned());
    }
    let distinct: std::collections::BTreeSet<_> = namespaces.iter().collect();
    assert_eq!(distinct.len(), namespaces.len(), "shared namespaces: {namespaces:?}");
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
        match env.driver.connect_port(&id, 8080, Duration::from_secs(5)).await {
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
    hutch_testkit::busybox_rootfs(&bottom, &["sh", "cat", "ls", "echo"])?;
    std::fs::create_dir_all(bottom.join("data"))?;
    std::fs::create_dir_all(top.join("data"))?;
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

#[tokio::test]
async fn sandbox_inherits_no_descriptor_of_the_driver_process() -> anyhow::Result<()> {
    let env = TestEnv::new("fds")?;
    // A pipe without close-on-exec, like one another thread is handing to a helper at
    // the moment of the clone: the sandbox must not keep its write end open.
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two new descriptors into the array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK) }, 0);
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (read, write) = unsafe {
        use std::os::fd::FromRawFd;
        (std::fs::File::from_raw_fd(fds[0]), std::os::fd::OwnedFd::from_raw_fd(fds[1]))
    };
    let info = env.driver.create(env.spec("fds")).await?;
    drop(write);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match std::io::Read::read(&mut &read, &mut [0u8; 1]) {
            Ok(0) => break,
            Ok(_) => panic!("nobody wrote to the pipe"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let held = std::fs::read_dir(format!("/proc/{}/fd", info.pid))?.count();
                assert!(
                    std::time::Instant::now() < deadline,
                    "the sandbox holds the pipe's write end ({held} descriptors open in PID 1)"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    env.driver.destroy(&env.id("fds")).await?;
    Ok(())
}

/// What every syscall probe script starts with: `probe(name, nr, *args)`
/// makes the raw syscall and prints `name ret errno`.
const PROBE_PRELUDE: &str = r#"
import ctypes, os, socket
libc = ctypes.CDLL(None, use_errno=True)
def probe(name, nr, *args):
    ctypes.set_errno(0)
    ret = libc.syscall(nr, *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    print(name, ret, ctypes.get_errno())
"#;

fn probe_script(body: &str) -> String {
    format!("{PROBE_PRELUDE}{body}")
}
