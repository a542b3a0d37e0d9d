//! `abusectl server`: run the engine on a backend in the foreground.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use abuse_servers::engine::EngineError;
use abuse_servers::file::{FileBackend, FileOptions};
use abuse_servers::filter::FilterSpec;
use abuse_servers::null::Null;
use abuse_servers::{device_status, Backend, Server, Stats, StopSignals};
use abuse_sys::Control;

use crate::opts::{parse_size, SetupOpts};

#[derive(clap::Args)]
pub struct ServerArgs {
    /// The control node, e.g. /dev/abctl0.
    ctl: PathBuf,
    /// The backend: `null [SIZE]`, `file PATH`, `cow DELTA [BASE]`,
    /// `qcow2 IMAGE`, `nbd ADDRESS` (unix:PATH, nbd://HOST[:PORT][/EXPORT],
    /// nbd+unix:///EXPORT?socket=PATH) or `rbd POOL/IMAGE`.
    backend: String,
    /// The backend's arguments.
    args: Vec<String>,
    /// Worker threads, each fetching from its own hardware queue first
    /// [default: one per hardware queue of the device; one for file].
    #[arg(long)]
    threads: Option<usize>,
    /// Threads that run a batch's requests at once [default: 4 for file
    /// and cow, none for null]; 0 runs them one by one in the worker.
    #[arg(long, value_name = "N")]
    io_threads: Option<usize>,
    /// Do not run each worker on its hardware queue's CPUs (they are
    /// pinned when there is one worker per queue, as by default).
    #[arg(long)]
    no_pin: bool,
    /// Keep the workers under the normal scheduling policy rather than
    /// switch them to SCHED_BATCH while requests come several at a time
    /// (under which a new request does not preempt the task that queued
    /// it: fewer, larger batches).
    #[arg(long)]
    no_sched_batch: bool,
    /// Requests per fetch and per completion.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Configure the device first (setup options; size defaults to the backend's).
    #[arg(long, value_name = "OPTS")]
    setup: Option<String>,
    /// file, qcow2, rbd: open read-only (the device is set up read-only).
    #[arg(long)]
    ro: bool,
    /// qcow2: let the image's backing chain name files outside the
    /// image's directory (by default refused: an image is untrusted input,
    /// and a server run by root would read any file it names).
    #[arg(long)]
    backing_anywhere: bool,
    /// file: O_DIRECT.
    #[arg(long)]
    direct: bool,
    /// file: move the data through the server's buffers (pread/pwrite)
    /// rather than have the kernel move it between the request and the
    /// file itself.
    #[arg(long)]
    copy_data: bool,
    /// rbd: the Ceph configuration [default: librados' search, e.g.
    /// /etc/ceph/ceph.conf].
    #[arg(long, value_name = "FILE")]
    conf: Option<PathBuf>,
    /// rbd: the Ceph client id (`admin` for client.admin).
    #[arg(long, value_name = "NAME")]
    id: Option<String>,
    /// Write this server's counters here as JSON (every second and at exit).
    #[arg(long, value_name = "PATH")]
    stats_file: Option<PathBuf>,
    /// A filter over the backend, NAME[:KEY=VAL,...]; repeatable, the first
    /// given sees each request first: delay:read=10ms,write=DUR,...;
    /// error:[read,write,flush,discard,write_zeroes],rate=N%,errno=EIO,seed=N,after=N,sectors=A-B;
    /// flaky:up=DUR,down=DUR,mode=drop|fail; log:file=PATH;
    /// rate:iops=N,bw=N[K|M|G]; readonly.
    #[arg(long = "filter", value_name = "SPEC", value_parser = FilterSpec::parse)]
    filters: Vec<FilterSpec>,
}

fn backend(a: &ServerArgs) -> Result<Arc<dyn Backend>, String> {
    match (a.backend.as_str(), a.args.as_slice()) {
        ("null", []) => Ok(Arc::new(Null::new(1 << 30))),
        ("null", [size]) => Ok(Arc::new(Null::new(parse_size(size)?))),
        ("file", [path]) => {
            let b = FileBackend::open(
                path.as_ref(),
                FileOptions {
                    read_only: a.ro,
                    direct: a.direct,
                },
            )
            .map_err(|e| format!("{path}: {e}"))?;
            Ok(Arc::new(b))
        }
        ("cow", [delta]) | ("cow", [delta, _]) => {
            let base = a.args.get(1).map(std::path::Path::new);
            let cow =
                abuse_servers::cow::Cow::open(delta.as_ref(), base).map_err(|e| e.to_string())?;
            if let Some(n) = cow.adopted().filter(|&n| n > 0) {
                eprintln!(
                    "abusectl server: {delta}: kept {n} acknowledged first writes a previous server of this delta left uncommitted (the next FLUSH commits them)"
                );
            }
            Ok(Arc::new(cow))
        }
        ("qcow2", [path]) => {
            let q = abuse_servers::qcow2::Qcow2::open_with(path.as_ref(), a.ro, a.backing_anywhere)
                .map_err(|e| format!("{path}: {e}"))?;
            Ok(Arc::new(q))
        }
        ("qcow2", _) => Err("usage: abusectl server CTL qcow2 IMAGE".into()),
        ("rbd", [image]) => {
            let spec = abuse_servers::rbd::RbdSpec {
                conf: a.conf.clone(),
                id: a.id.clone(),
                read_only: a.ro,
                ..abuse_servers::rbd::RbdSpec::parse(image)?
            };
            let r = abuse_servers::rbd::Rbd::open(&spec).map_err(|e| format!("{image}: {e}"))?;
            Ok(Arc::new(r))
        }
        ("rbd", _) => {
            Err("usage: abusectl server CTL rbd POOL/IMAGE [--conf FILE] [--id NAME]".into())
        }
        ("nbd", [addr]) => {
            let addr = abuse_servers::nbd::Address::parse(addr)?;
            let nbd = abuse_servers::nbd::Nbd::connect(addr).map_err(|e| e.to_string())?;
            Ok(Arc::new(nbd))
        }
        ("nbd", _) => Err("usage: abusectl server CTL nbd unix:PATH | nbd://HOST[:PORT][/EXPORT] | nbd+unix:///EXPORT?socket=PATH".into()),
        ("cow", _) => Err("usage: abusectl server CTL cow DELTA [BASE]".into()),
        ("null", _) => Err("usage: abusectl server CTL null [SIZE]".into()),
        ("file", _) => Err("usage: abusectl server CTL file PATH".into()),
        (other, _) => Err(format!("unknown backend '{other}' (null, file, cow, qcow2, nbd, rbd)")),
    }
}

fn stats_json(s: &Stats) -> serde_json::Value {
    let t = s.totals();
    let mut m = serde_json::Map::new();
    m.insert("pid".into(), std::process::id().into());
    m.insert("requests".into(), t.requests().into());
    for (name, n) in t.named() {
        m.insert(name.into(), n.into());
    }
    m.into()
}

fn save(path: &Option<PathBuf>, s: &Stats) {
    if let Some(p) = path {
        let tmp = p.with_extension("tmp");
        if std::fs::write(&tmp, stats_json(s).to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
    }
}

pub fn run(a: ServerArgs) -> Result<(), String> {
    // SIGINT/SIGTERM go to one thread that asks the workers to stop; they
    // complete what they fetched and return. Blocked before anything starts
    // a thread (the cow backend hashes its base on a rayon pool), so that
    // every thread inherits the mask.
    let signals = StopSignals::block().map_err(|e| format!("blocking signals: {e}"))?;
    let backend = abuse_servers::filter::wrap_shared(backend(&a)?, &a.filters)?;
    if let Some(opts) = &a.setup {
        let o = SetupOpts::parse(&[opts])?;
        let ctl = Control::open(&a.ctl).map_err(|e| e.to_string())?;
        let st = if o.reconnect {
            o.reconnect_status(&ctl.status().map_err(|e| e.to_string())?)?
        } else {
            // The backend's size unless given; exactly its features.
            device_status(&*backend, o.to_status(o.size.unwrap_or(backend.size())))?
        };
        ctl.set_status(&st).map_err(|e| e.to_string())?;
        crate::delegate::node_owner(&a.ctl, &st)?;
    }
    let stop = signals.watch();
    let stats = Arc::new(Stats::default());
    if a.stats_file.is_some() {
        let (stop, stats, path) = (stop.clone(), stats.clone(), a.stats_file.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                save(&path, &stats);
                std::thread::sleep(Duration::from_secs(1));
            }
        });
    }
    let result = Server::shared(&a.ctl, backend)
        .config(|cfg| {
            cfg.threads = a.threads.unwrap_or(0);
            cfg.batch = a.batch;
            cfg.io_threads = a.io_threads;
            cfg.pin = !a.no_pin;
            cfg.sched_batch = !a.no_sched_batch;
            cfg.copy_data = a.copy_data;
        })
        .stop_on(stop)
        .stats(stats.clone())
        .run();
    let result = match result {
        Err(EngineError::Stop(e)) => {
            eprintln!("abusectl server: stopping the backend: {e}");
            Ok(())
        }
        other => other,
    };
    save(&a.stats_file, &stats);
    eprintln!("abusectl server: {}", stats_json(&stats));
    result.map_err(|e| e.to_string())
}
