//! Workers as child processes of the bench (`freshet-bench serve-worker`), so their CPU
//! time and peak RSS are measured on their own, apart from the coordinator's.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

/// Running worker processes; killed when dropped.
pub struct WorkerProcs {
    procs: Vec<(Child, String)>,
}

impl WorkerProcs {
    /// Starts `n` workers (one task at a time each: N workers = N-way parallelism).
    pub fn spawn(n: usize) -> Result<WorkerProcs> {
        let exe = std::env::current_exe()?;
        let mut procs = Vec::new();
        for i in 0..n {
            let mut child = Command::new(&exe)
                .args(["serve-worker", "--id", &format!("w{i}")])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("spawning a worker")?;
            let mut line = String::new();
            BufReader::new(child.stdout.take().context("worker stdout")?).read_line(&mut line)?;
            let Some(addr) = line.trim().strip_prefix("listening ") else {
                let _ = child.kill();
                bail!("worker w{i} printed {line:?} instead of its address");
            };
            procs.push((child, addr.to_string()));
        }
        Ok(WorkerProcs { procs })
    }

    /// Their gRPC endpoints.
    pub fn endpoints(&self) -> Vec<String> {
        self.procs.iter().map(|p| p.1.clone()).collect()
    }

    /// User + system CPU seconds of all workers so far.
    pub fn cpu_s(&self) -> f64 {
        // SAFETY: sysconf has no preconditions.
        let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        self.procs
            .iter()
            .filter_map(|(c, _)| std::fs::read_to_string(format!("/proc/{}/stat", c.id())).ok())
            .map(|s| {
                // Fields after the parenthesised command name; utime and stime are 14 and 15.
                let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
                let f: Vec<&str> = rest.split_whitespace().collect();
                let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
                (n(11) + n(12)) / tick
            })
            .sum()
    }

    /// The largest peak RSS (VmHWM, KiB) of any worker.
    pub fn peak_rss_kib(&self) -> u64 {
        self.procs
            .iter()
            .filter_map(|(c, _)| vm_hwm_kib(&c.id().to_string()))
            .max()
            .unwrap_or(0)
    }
}

/// The peak RSS (VmHWM, KiB) of process `pid` (`self` for this one).
pub fn vm_hwm_kib(pid: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

impl Drop for WorkerProcs {
    fn drop(&mut self) {
        for (c, _) in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The body of `serve-worker`: serve until killed, after printing the address.
pub async fn serve_worker(id: String) -> Result<()> {
    let (listener, addr) = freshet_worker::bind("127.0.0.1:0").await?;
    println!("listening http://{addr}");
    use std::io::Write;
    std::io::stdout().flush()?;
    let w = freshet_worker::Worker::new(id, 1, Default::default());
    freshet_worker::serve(w, listener, 1 << 30, std::future::pending()).await?;
    Ok(())
}
