//! A throwaway local PostgreSQL cluster for the demo, the tests and the benchmark.
//!
//! [`Cluster::start`] runs `initdb` into a fresh temporary directory and starts a server on a
//! free `127.0.0.1` port with `pg_ctl`. The data directory, the Unix socket directory and the
//! server log all live in that temporary directory, which is removed when the [`Cluster`] is
//! dropped. PostgreSQL refuses to run as root, so when the current process is root every
//! server-side binary is run as the `postgres` user through `runuser`.

use std::collections::BTreeSet;
use std::ffi::{CString, OsStr};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::process::Command;

/// Environment variable naming the PostgreSQL bin directory to use.
const BIN_ENV: &str = "WALPUSH_PG_BIN";
/// How many times a start is retried on a fresh port when the chosen one got taken.
const PORT_ATTEMPTS: usize = 5;
/// How long to wait for the server to accept connections after `pg_ctl start`.
const CONNECT_DEADLINE: Duration = Duration::from_secs(30);
/// Upper bound for one `initdb` run.
const INITDB_TIMEOUT: Duration = Duration::from_secs(120);
/// Seconds `pg_ctl` itself waits for a start or stop to complete.
const PG_CTL_WAIT_SECS: u64 = 60;
/// Upper bound for one `pg_ctl` run, a little above its own wait.
const PG_CTL_TIMEOUT: Duration = Duration::from_secs(PG_CTL_WAIT_SECS + 30);
/// Number of trailing lines of stderr and of the server log quoted in errors.
const TAIL_LINES: usize = 20;

/// Ports handed to clusters of this process that are still alive, so that two clusters started
/// at the same time never race for the same port.
static RESERVED_PORTS: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// Errors from creating, starting, stopping or talking to a [`Cluster`].
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No usable PostgreSQL bin directory was found.
    #[error("postgresql binaries not found: {what}")]
    NotFound {
        /// What was looked for and where.
        what: String,
    },
    /// A PostgreSQL command could not be spawned.
    #[error("could not run {command}: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why spawning failed.
        source: std::io::Error,
    },
    /// A PostgreSQL command exited unsuccessfully.
    #[error("{command} failed with {status}: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// The last lines of its output, followed by the last lines of the server log.
        stderr: String,
    },
    /// A filesystem operation failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// Something did not finish in time.
    #[error("timed out {what}")]
    Timeout {
        /// What was being waited for, with the last error and server log lines.
        what: String,
    },
    /// A statement sent to the cluster failed.
    #[error("sql error: {0}")]
    Sql(#[from] tokio_postgres::Error),
    /// The process runs as root but there is no `postgres` user to run the server as.
    #[error("running as root but there is no postgres user to run the server as")]
    NoPostgresUser,
}

/// How to configure a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The `wal_level` setting; `logical` by default.
    pub wal_level: String,
    /// Whether `fsync` is on; on by default. Turning it off speeds up tests and benchmarks.
    pub fsync: bool,
    /// Extra `name=value` server settings, applied after (and so overriding) the built-in ones.
    pub settings: Vec<(String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            wal_level: "logical".to_owned(),
            fsync: true,
            settings: Vec::new(),
        }
    }
}

/// The account PostgreSQL commands run as when this process is root.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// A running throwaway PostgreSQL cluster; its files are removed when it drops.
#[derive(Debug)]
pub struct Cluster {
    bin_dir: PathBuf,
    run_as: Option<RunAs>,
    port: u16,
    server_args: String,
    running: AtomicBool,
    // Declared last so it is dropped after `Drop::drop` has stopped the server.
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Runs `initdb` (`-A trust`, `-U postgres`, `--no-sync`, `-E UTF8`) into a new temporary
    /// directory and starts the server on a free `127.0.0.1` port, waiting until it accepts
    /// connections.
    pub async fn start(options: ClusterOptions) -> Result<Cluster, ClusterError> {
        let began = Instant::now();
        let bin_dir = find_bin_dir()?;
        let run_as = if is_root() {
            Some(postgres_user()?)
        } else {
            None
        };
        let dir = make_temp_dir(run_as)?;
        let sock_dir = dir.path().join("sock");
        std::fs::create_dir(&sock_dir)?;
        if let Some(user) = run_as {
            std::os::unix::fs::chown(&sock_dir, Some(user.uid), Some(user.gid))?;
        }

        let mut cluster = Cluster {
            bin_dir,
            run_as,
            port: 0,
            server_args: String::new(),
            running: AtomicBool::new(false),
            dir,
        };
        cluster.initdb().await?;

        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = reserve_port()?;
            cluster.port = port;
            cluster.server_args = server_args(&options, port, &sock_dir);
            match cluster.start_server().await {
                Ok(()) => break,
                Err(error) if attempt < PORT_ATTEMPTS && is_port_conflict(&error) => {
                    tracing::debug!(port, attempt, "port taken, retrying with another one");
                    release_port(port);
                }
                Err(error) => {
                    release_port(port);
                    cluster.port = 0;
                    return Err(error);
                }
            }
        }
        tracing::debug!(
            port = cluster.port,
            dir = %cluster.dir.path().display(),
            elapsed_ms = began.elapsed().as_millis() as u64,
            "cluster started"
        );
        Ok(cluster)
    }

    /// The TCP port the server listens on (on `127.0.0.1`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for `database`: `postgres://postgres@127.0.0.1:{port}/{database}`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates the database `name`, a plain identifier that is quoted as is.
    pub async fn create_database(&self, name: &str) -> Result<(), ClusterError> {
        let client = self.connect("postgres").await?;
        let statement = format!("CREATE DATABASE {}", quote_ident(name));
        client.batch_execute(&statement).await?;
        tracing::debug!(port = self.port, database = name, "database created");
        Ok(())
    }

    /// Stops the server (`-m fast`) and starts it again on the same port, waiting until it
    /// accepts connections.
    pub async fn restart(&self) -> Result<(), ClusterError> {
        self.stop().await?;
        self.start_server().await?;
        tracing::debug!(port = self.port, "cluster restarted");
        Ok(())
    }

    /// Stops the server (`-m fast`); does nothing when it is already stopped. The temporary
    /// directory stays until the [`Cluster`] drops.
    pub async fn stop(&self) -> Result<(), ClusterError> {
        if !self.running.load(Ordering::SeqCst) {
            return Ok(());
        }
        let wait = PG_CTL_WAIT_SECS.to_string();
        let data = self.data_dir();
        let args: [&OsStr; 8] = [
            "stop".as_ref(),
            "-D".as_ref(),
            data.as_os_str(),
            "-m".as_ref(),
            "fast".as_ref(),
            "-w".as_ref(),
            "-t".as_ref(),
            wait.as_ref(),
        ];
        let log_start = Some(self.log_len());
        if let Err(error) = self.run("pg_ctl", &args, PG_CTL_TIMEOUT, log_start).await {
            // Exit status 3 from `pg_ctl status` means no server is running: it died already.
            if self.status_code().await != Some(3) {
                return Err(error);
            }
            tracing::warn!(port = self.port, %error, "server was not running at stop");
        }
        self.running.store(false, Ordering::SeqCst);
        tracing::debug!(port = self.port, "cluster stopped");
        Ok(())
    }

    /// The PostgreSQL bin directory whose binaries run this cluster.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The server log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    async fn initdb(&self) -> Result<(), ClusterError> {
        let data = self.data_dir();
        // `--locale=C` keeps initdb from tripping over an environment locale that does not
        // match UTF8.
        let args: [&OsStr; 10] = [
            "-D".as_ref(),
            data.as_os_str(),
            "-A".as_ref(),
            "trust".as_ref(),
            "-U".as_ref(),
            "postgres".as_ref(),
            "--no-sync".as_ref(),
            "-E".as_ref(),
            "UTF8".as_ref(),
            "--locale=C".as_ref(),
        ];
        self.run("initdb", &args, INITDB_TIMEOUT, None).await
    }

    /// Starts the server with the current port and settings and waits until it accepts
    /// connections.
    async fn start_server(&self) -> Result<(), ClusterError> {
        let data = self.data_dir();
        let log = self.log_path();
        let wait = PG_CTL_WAIT_SECS.to_string();
        let args: [&OsStr; 10] = [
            "start".as_ref(),
            "-D".as_ref(),
            data.as_os_str(),
            "-w".as_ref(),
            "-t".as_ref(),
            wait.as_ref(),
            "-l".as_ref(),
            log.as_os_str(),
            "-o".as_ref(),
            self.server_args.as_ref(),
        ];
        let log_start = Some(self.log_len());
        // From here on Drop must try to stop whatever may have come up.
        self.running.store(true, Ordering::SeqCst);
        let started = match self.run("pg_ctl", &args, PG_CTL_TIMEOUT, log_start).await {
            Ok(()) => self.wait_for_connections(log_start).await,
            Err(error) => Err(error),
        };
        if started.is_err() {
            self.stop_immediately().await;
        }
        started
    }

    /// Polls until a connection succeeds or [`CONNECT_DEADLINE`] passes.
    async fn wait_for_connections(&self, log_start: Option<u64>) -> Result<(), ClusterError> {
        let deadline = Instant::now() + CONNECT_DEADLINE;
        loop {
            let last_error = match self.connect("postgres").await {
                Ok(_client) => return Ok(()),
                Err(error) => error,
            };
            if Instant::now() >= deadline {
                let log = self.log_tail(log_start).await;
                return Err(ClusterError::Timeout {
                    what: format!(
                        "waiting for the server on port {} to accept connections \
                         (last error: {last_error}){log}",
                        self.port
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn connect(&self, database: &str) -> Result<tokio_postgres::Client, ClusterError> {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .dbname(database)
            .connect_timeout(Duration::from_secs(5));
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "cluster connection ended with an error");
            }
        });
        Ok(client)
    }

    /// Best-effort `pg_ctl stop -m immediate`, used to clean up after a failed start.
    async fn stop_immediately(&self) {
        let mut command = self.command("pg_ctl");
        command
            .arg("stop")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "-t", "10"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let _ = tokio::time::timeout(Duration::from_secs(20), command.status()).await;
        self.running.store(false, Ordering::SeqCst);
    }

    /// The exit code of `pg_ctl status`, if it could be run.
    async fn status_code(&self) -> Option<i32> {
        let mut command = self.command("pg_ctl");
        command
            .arg("status")
            .arg("-D")
            .arg(self.data_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        match tokio::time::timeout(Duration::from_secs(20), command.status()).await {
            Ok(Ok(status)) => status.code(),
            _ => None,
        }
    }

    /// A command running the PostgreSQL binary `program`, as the `postgres` user when needed.
    fn command(&self, program: &str) -> Command {
        let path = self.bin_dir.join(program);
        let mut command = match self.run_as {
            Some(_) => {
                let mut command = Command::new("runuser");
                command.args(["-u", "postgres", "--"]).arg(path);
                command
            }
            None => Command::new(path),
        };
        // The `postgres` user may not be able to enter the caller's working directory.
        command.current_dir(self.dir.path());
        command
    }

    /// Runs `program` with `args` and turns a failure into an error quoting its output and,
    /// when `log_start` is given, the server log written since that offset.
    async fn run(
        &self,
        program: &str,
        args: &[&OsStr],
        timeout: Duration,
        log_start: Option<u64>,
    ) -> Result<(), ClusterError> {
        let mut command = self.command(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let line = command_line(program, args);
        tracing::debug!(command = %line, "running postgresql command");
        let child = command.spawn().map_err(|source| ClusterError::Spawn {
            command: line.clone(),
            source,
        })?;
        let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(output) => output?,
            Err(_) => {
                let log = self.log_tail(log_start).await;
                return Err(ClusterError::Timeout {
                    what: format!("after {}s running {line}{log}", timeout.as_secs()),
                });
            }
        };
        if output.status.success() {
            return Ok(());
        }
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        let mut stderr = tail(&text, TAIL_LINES);
        stderr.push_str(&self.log_tail(log_start).await);
        Err(ClusterError::Command {
            command: line,
            status: output.status,
            stderr,
        })
    }

    /// The current size of the server log, or 0 when it does not exist yet.
    fn log_len(&self) -> u64 {
        std::fs::metadata(self.log_path()).map_or(0, |meta| meta.len())
    }

    /// `"; server log: ..."` with the last lines written to the server log since `from`, or an
    /// empty string when there is nothing to show.
    async fn log_tail(&self, from: Option<u64>) -> String {
        let Some(from) = from else {
            return String::new();
        };
        let Ok(bytes) = tokio::fs::read(self.log_path()).await else {
            return String::new();
        };
        let start = usize::try_from(from).unwrap_or(0).min(bytes.len());
        let text = String::from_utf8_lossy(&bytes[start..]);
        let lines = tail(&text, TAIL_LINES);
        if lines.is_empty() {
            String::new()
        } else {
            format!("; server log: {lines}")
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running.swap(false, Ordering::SeqCst) {
            let program = self.bin_dir.join("pg_ctl");
            let mut command = match self.run_as {
                Some(_) => {
                    let mut command = std::process::Command::new("runuser");
                    command.args(["-u", "postgres", "--"]).arg(program);
                    command
                }
                None => std::process::Command::new(program),
            };
            let status = command
                .arg("stop")
                .arg("-D")
                .arg(self.data_dir())
                .args(["-m", "immediate", "-w", "-t", "10"])
                .current_dir(self.dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            match status {
                Ok(status) if status.success() => {
                    tracing::debug!(port = self.port, "cluster stopped on drop");
                }
                Ok(status) => {
                    tracing::warn!(port = self.port, %status, "could not stop cluster on drop");
                }
                Err(error) => {
                    tracing::warn!(port = self.port, %error, "could not stop cluster on drop");
                }
            }
        }
        if self.port != 0 {
            release_port(self.port);
        }
    }
}

/// Finds the PostgreSQL bin directory: `$WALPUSH_PG_BIN`, then the highest
/// `/usr/lib/postgresql/<version>/bin`, then the directory of `initdb` on `PATH`.
pub fn find_bin_dir() -> Result<PathBuf, ClusterError> {
    if let Some(dir) = std::env::var_os(BIN_ENV).filter(|dir| !dir.is_empty()) {
        let dir = PathBuf::from(dir);
        return if has_binaries(&dir) {
            Ok(dir)
        } else {
            Err(ClusterError::NotFound {
                what: format!("{BIN_ENV}={} has no initdb and pg_ctl", dir.display()),
            })
        };
    }
    if let Some(dir) = highest_versioned_dir(Path::new("/usr/lib/postgresql")) {
        return Ok(dir);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let initdb = dir.join("initdb");
            if !initdb.is_file() {
                continue;
            }
            // Prefer the real install directory behind a symlink, which also has the other
            // binaries (pg_recvlogical and friends).
            if let Some(real) = std::fs::canonicalize(&initdb)
                .ok()
                .and_then(|real| real.parent().map(Path::to_path_buf))
                .filter(|real| has_binaries(real))
            {
                return Ok(real);
            }
            if has_binaries(&dir) {
                return Ok(dir);
            }
        }
    }
    Err(ClusterError::NotFound {
        what: format!("set {BIN_ENV} or install postgresql"),
    })
}

fn has_binaries(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("pg_ctl").is_file()
}

/// The `bin` directory of the highest numeric version under `root` that has the binaries.
fn highest_versioned_dir(root: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(root).ok()?;
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = parse_version(entry.file_name().to_str()?)?;
            let bin = entry.path().join("bin");
            has_binaries(&bin).then_some((version, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
}

/// Parses `15` or `9.6` into comparable numbers.
fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Looks up the uid and gid of the `postgres` user.
fn postgres_user() -> Result<RunAs, ClusterError> {
    let name = CString::new("postgres").map_err(|_| ClusterError::NoPostgresUser)?;
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain old data; an all-zero value is valid and is filled in below.
    let mut passwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the duration of the call and the buffer length is
    // its real size; getpwnam_r only writes into `passwd`, `buffer` and `result`.
    let code = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut passwd,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut result,
        )
    };
    if code != 0 || result.is_null() {
        return Err(ClusterError::NoPostgresUser);
    }
    Ok(RunAs {
        uid: passwd.pw_uid,
        gid: passwd.pw_gid,
    })
}

/// Creates the cluster's temporary directory, owned by `run_as` when given. As root it is made
/// under `/tmp`, which every user can traverse, rather than under a possibly private `$TMPDIR`.
fn make_temp_dir(run_as: Option<RunAs>) -> Result<tempfile::TempDir, ClusterError> {
    let mut builder = tempfile::Builder::new();
    builder.prefix("walpush-pg-");
    let dir = match run_as {
        Some(user) => {
            let dir = builder.tempdir_in("/tmp")?;
            std::os::unix::fs::chown(dir.path(), Some(user.uid), Some(user.gid))?;
            dir
        }
        None => builder.tempdir()?,
    };
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
    Ok(dir)
}

/// Picks a free `127.0.0.1` port not already reserved by another cluster of this process and
/// reserves it.
fn reserve_port() -> Result<u16, ClusterError> {
    for _ in 0..50 {
        let port = TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port();
        let mut reserved = RESERVED_PORTS.lock().unwrap_or_else(|e| e.into_inner());
        if reserved.insert(port) {
            return Ok(port);
        }
    }
    Err(ClusterError::Timeout {
        what: "looking for a free port".to_owned(),
    })
}

fn release_port(port: u16) {
    let mut reserved = RESERVED_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    reserved.remove(&port);
}

/// Whether a failed start was caused by the port being in use.
fn is_port_conflict(error: &ClusterError) -> bool {
    let text = match error {
        ClusterError::Command { stderr, .. } => stderr.as_str(),
        ClusterError::Timeout { what } => what.as_str(),
        _ => return false,
    };
    text.contains("Address already in use") || text.contains("could not create any TCP/IP")
}

/// The `-o` argument for `pg_ctl start`: every setting as `-c 'name=value'`.
fn server_args(options: &ClusterOptions, port: u16, sock_dir: &Path) -> String {
    let fixed = [
        ("listen_addresses", "127.0.0.1".to_owned()),
        ("port", port.to_string()),
        ("unix_socket_directories", sock_dir.display().to_string()),
        ("wal_level", options.wal_level.clone()),
        ("fsync", if options.fsync { "on" } else { "off" }.to_owned()),
        ("max_wal_senders", "40".to_owned()),
        ("max_replication_slots", "40".to_owned()),
        ("max_connections", "200".to_owned()),
        ("shared_buffers", "128MB".to_owned()),
        ("wal_sender_timeout", "60s".to_owned()),
        ("log_min_messages", "warning".to_owned()),
    ];
    let extra = options
        .settings
        .iter()
        .map(|(name, value)| (name.as_str(), value.clone()));
    fixed
        .into_iter()
        .chain(extra)
        .map(|(name, value)| format!("-c {}", shell_quote(&format!("{name}={value}"))))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Quotes `text` for the shell `pg_ctl` starts the server through.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Quotes an SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn command_line(program: &str, args: &[&OsStr]) -> String {
    let mut line = program.to_owned();
    for arg in args {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// The last `lines` non-empty lines of `text`, joined with `" | "`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|line| !line.is_empty())
        .collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn show(cluster: &Cluster, database: &str, setting: &str) -> String {
        let client = cluster.connect(database).await.unwrap();
        let row = client
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .unwrap();
        row.get(0)
    }

    async fn connect_url(url: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }

    #[tokio::test]
    async fn start_create_restart_stop_and_clean_up() {
        let began = Instant::now();
        let cluster = Cluster::start(ClusterOptions::default()).await.unwrap();
        eprintln!("start took {:?}", began.elapsed());
        let dir = cluster.log_path().parent().unwrap().to_path_buf();
        assert!(dir.join("data").join("PG_VERSION").is_file());
        assert!(cluster.bin_dir().join("pg_ctl").is_file());
        assert_ne!(cluster.port(), 5432);
        assert_eq!(
            cluster.url("app"),
            format!("postgres://postgres@127.0.0.1:{}/app", cluster.port())
        );

        assert_eq!(show(&cluster, "postgres", "wal_level").await, "logical");
        assert_eq!(show(&cluster, "postgres", "fsync").await, "on");
        assert_eq!(show(&cluster, "postgres", "max_wal_senders").await, "40");
        assert_eq!(
            show(&cluster, "postgres", "listen_addresses").await,
            "127.0.0.1"
        );

        cluster.create_database("walpush_test").await.unwrap();
        let client = connect_url(&cluster.url("walpush_test")).await;
        let row = client
            .query_one("SELECT current_database()", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "walpush_test");
        client
            .batch_execute("CREATE TABLE kept (id int); INSERT INTO kept VALUES (7)")
            .await
            .unwrap();
        drop(client);

        // Creating it twice is an SQL error, not a panic.
        assert!(matches!(
            cluster.create_database("walpush_test").await,
            Err(ClusterError::Sql(_))
        ));

        let port = cluster.port();
        cluster.restart().await.unwrap();
        assert_eq!(cluster.port(), port);
        let client = connect_url(&cluster.url("walpush_test")).await;
        let row = client.query_one("SELECT id FROM kept", &[]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 7);
        drop(client);

        cluster.stop().await.unwrap();
        cluster.stop().await.unwrap();
        assert!(
            tokio_postgres::connect(&cluster.url("postgres"), tokio_postgres::NoTls)
                .await
                .is_err()
        );
        assert!(dir.exists());
        assert!(std::fs::read_to_string(cluster.log_path()).is_ok());
        drop(cluster);
        assert!(!dir.exists());
    }

    #[tokio::test]
    async fn replica_wal_level_and_extra_settings() {
        let options = ClusterOptions {
            wal_level: "replica".to_owned(),
            fsync: false,
            settings: vec![("application_name".to_owned(), "it's a test".to_owned())],
        };
        let cluster = Cluster::start(options).await.unwrap();
        assert_eq!(show(&cluster, "postgres", "wal_level").await, "replica");
        assert_eq!(show(&cluster, "postgres", "fsync").await, "off");
        let dir = cluster.log_path().parent().unwrap().to_path_buf();
        // Dropped while running: the server is stopped and the directory removed.
        drop(cluster);
        assert!(!dir.exists());
    }

    #[tokio::test]
    async fn two_clusters_get_different_ports() {
        let (a, b) = tokio::join!(
            Cluster::start(ClusterOptions::default()),
            Cluster::start(ClusterOptions::default())
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_ne!(a.port(), b.port());
        assert_ne!(a.log_path(), b.log_path());
        assert_eq!(show(&a, "postgres", "port").await, a.port().to_string());
        assert_eq!(show(&b, "postgres", "port").await, b.port().to_string());
    }

    #[tokio::test]
    async fn bad_setting_fails_with_the_server_log() {
        let options = ClusterOptions {
            settings: vec![("no_such_setting".to_owned(), "1".to_owned())],
            ..ClusterOptions::default()
        };
        let error = Cluster::start(options).await.unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, ClusterError::Command { .. }), "{message}");
        assert!(message.contains("no_such_setting"), "{message}");
    }

    #[test]
    fn helpers() {
        assert_eq!(shell_quote("a=b"), "'a=b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(parse_version("9.6"), Some(vec![9, 6]));
        assert_eq!(parse_version("15"), Some(vec![15]));
        assert_eq!(parse_version("main"), None);
        assert!(parse_version("10") > parse_version("9.6"));
        assert_eq!(tail("a\n\nb\nc\n", 2), "b | c");
        assert_eq!(tail("", 2), "");
        let args = server_args(&ClusterOptions::default(), 5999, Path::new("/x/sock"));
        assert!(args.starts_with("-c 'listen_addresses=127.0.0.1' -c 'port=5999'"));
        assert!(args.contains("-c 'wal_level=logical'"));
        assert!(args.contains("-c 'fsync=on'"));
        let conflict = ClusterError::Timeout {
            what: "x; server log: LOG:  could not bind IPv4 address: Address already in use"
                .to_owned(),
        };
        assert!(is_port_conflict(&conflict));
        assert!(!is_port_conflict(&ClusterError::NoPostgresUser));
    }

    #[test]
    fn finds_a_bin_dir() {
        let dir = find_bin_dir().unwrap();
        assert!(dir.join("initdb").is_file());
        assert!(dir.join("pg_ctl").is_file());
    }
}
