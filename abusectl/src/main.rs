//! abusectl: the user's tool for ABUSE devices.

mod cow;
mod debug;
mod delegate;
mod opts;
mod progress;
mod server;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use abuse_sys::Control;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "abusectl",
    version,
    about = "Set up, inspect and serve ABUSE block devices (/dev/abuseN via /dev/abctlN)",
    after_help = "Example:\n  abusectl setup /dev/abctl0 size=1G\n  abusectl server /dev/abctl0 file disk.img --threads 4 &\n  mkfs.ext4 /dev/abuse0 && mount /dev/abuse0 /mnt"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Configure a device: size, block size, queue depth, flags.
    #[command(
        after_help = "Options (comma- or space-separated; sizes take K/M/G/T):\n  \
        size=N       capacity (required), a multiple of bs\n  \
        bs=N         block size: 512, 1024, 2048 or 4096 (default 4096)\n  \
        qs=N         queue depth per hardware queue, 1-1024 (default 128)\n  \
        queues=N     hardware queues, 1-32 (default one per online CPU)\n  \
        owner=U[:G]  delegate: user U may serve the device without root\n  \
        timeout=S    seconds a server may hold a request before it is killed and its\n               \
        requests go to another server (default 30, at least 1, 0 = never)\n  \
        ro | rw      read-only or read-write (default rw)\n  \
        reconnect    on a configured device: change only the ro/rw and qs given\n  \
        flush fua discard write_zeroes   what the server handles\n\n\
        Examples:\n  abusectl setup /dev/abctl0 size=1G\n  abusectl setup /dev/abctl0 size=64M,bs=512,qs=32,flush,fua\n  abusectl setup /dev/abctl0 reconnect qs=64 ro"
    )]
    Setup {
        /// The control node, e.g. /dev/abctl0.
        ctl: PathBuf,
        /// Options: size=1G,bs=4096,qs=128,ro,timeout=30,flush,...
        #[arg(required = true)]
        opts: Vec<String>,
        /// Do nothing if the device is already configured (a service that
        /// restarts keeps the configuration it serves).
        #[arg(long)]
        if_unconfigured: bool,
    },
    /// Show a device's configuration and counters.
    #[command(
        after_help = "Examples:\n  abusectl info /dev/abctl0\n  abusectl info --json /dev/abctl0"
    )]
    Info {
        /// The control node, e.g. /dev/abctl0.
        ctl: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List every ABUSE device: configured or not, size, counters.
    #[command(after_help = "Examples:\n  abusectl list\n  abusectl list --json")]
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Fail everything outstanding and unconfigure the device.
    #[command(after_help = "Example:\n  abusectl reset /dev/abctl0")]
    Reset {
        /// The control node, e.g. /dev/abctl0.
        ctl: PathBuf,
    },
    /// Serve a device with a backend, in the foreground (SIGINT/SIGTERM stop it).
    #[command(after_help = "Backends:\n  \
        null [SIZE]   reads return zeroes, writes are dropped\n  \
        file PATH     a regular file or block device (size: the file's)\n  \
        cow DELTA [BASE]  copy-on-write over a read-only base (abusectl cow create)\n\n\
        Examples:\n  abusectl server /dev/abctl0 file disk.img --threads 4\n  \
        abusectl server /dev/abctl0 file disk.img --setup qs=64\n  \
        abusectl server /dev/abctl1 null 1G --setup ''\n  \
        abusectl server /dev/abctl0 file disk.img --filter delay:read=10ms --filter error:write,rate=1%,errno=EIO\n\n\
        Filters (--filter NAME[:KEY=VAL,...], repeatable; the first given sees each request first):\n  \
        delay:read=DUR,write=DUR,flush=DUR,discard=DUR,write_zeroes=DUR   (DUR: 10ms, 1.5s, 2 = seconds)\n  \
        error:[read,write,flush,discard,write_zeroes],rate=N%,errno=EIO,seed=N,after=N,sectors=A-B\n  \
        flaky:up=DUR,down=DUR,mode=drop|fail   while down, writes are dropped or fail\n  \
        log:file=PATH                          one line per request\n  \
        rate:iops=N,bw=N[K|M|G]                token-bucket limits\n  \
        readonly                               writes fail, the device is set up ro")]
    Server(server::ServerArgs),
    /// Copy-on-write deltas over a read-only base: create, info, merge.
    #[command(subcommand)]
    Cow(cow::CowCmd),
    /// Debugging: fetch pending requests, print them, and give them back.
    #[command(
        after_help = "The requests go back to the queue (flagged REQUEUED) when abusectl exits.\n\nExample:\n  abusectl get /dev/abctl0 --count 4"
    )]
    Get {
        ctl: PathBuf,
        /// Most requests to fetch.
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    /// Debugging: fetch pending requests and complete them by hand.
    #[command(
        after_help = "READs are answered with zeroes (or --data), WRITEs are dropped.\n\nExamples:\n  abusectl put /dev/abctl0\n  abusectl put /dev/abctl0 --count 8 --result media"
    )]
    Put {
        ctl: PathBuf,
        /// Most requests to complete.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// ok, media (that request fails) or device (everything fails).
        #[arg(long, default_value = "ok")]
        result: debug::ResultArg,
        /// A file whose first bytes answer READs.
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Debugging: wait until requests are pending.
    #[command(
        after_help = "Exits 0 when requests are pending, 1 after --timeout.\n\nExample:\n  abusectl poll /dev/abctl0 --timeout 5"
    )]
    Poll {
        ctl: PathBuf,
        /// Seconds to wait (default: forever).
        #[arg(long)]
        timeout: Option<f64>,
    },
    /// Print the shell completion script for SHELL (bash, zsh, fish, ...).
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (abusectl.1, abusectl-VERB.1) into DIR.
    #[command(hide = true)]
    Manpages { dir: PathBuf },
}

fn open(ctl: &PathBuf) -> Result<Control, String> {
    Control::open(ctl).map_err(|e| e.to_string())
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Setup {
            ctl,
            opts,
            if_unconfigured,
        } => {
            let o = opts::SetupOpts::parse(&opts)?;
            let ctl = open(&ctl)?;
            if if_unconfigured {
                let st = ctl.status().map_err(|e| e.to_string())?;
                if st.flags & abuse_sys::uapi::ABUSE_FLAG_CONFIGURED != 0 {
                    return Ok(());
                }
            }
            let st = if o.reconnect {
                // Only what was given changes: the rest is the device's.
                o.reconnect_status(&ctl.status().map_err(|e| e.to_string())?)?
            } else {
                o.to_status(o.size.ok_or("setup needs size=N (e.g. size=1G)")?)
            };
            ctl.set_status(&st).map_err(|e| e.to_string())?;
            delegate::node_owner(ctl.path(), &st)
        }
        Command::Info { ctl, json } => {
            let st = open(&ctl)?.status().map_err(|e| e.to_string())?;
            let info = status::Info::new(&ctl, &st);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&info).expect("serialisable")
                );
            } else {
                print!("{}", info.human());
            }
            Ok(())
        }
        Command::List { json } => {
            let infos = status::list().map_err(|e| e.to_string())?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&infos).expect("serialisable")
                );
            } else {
                print!("{}", status::table(&infos));
            }
            Ok(())
        }
        Command::Reset { ctl } => {
            open(&ctl)?.reset().map_err(|e| e.to_string())?;
            // RESET ended any delegation: the node is root's again.
            delegate::node_owner(&ctl, &abuse_sys::AbuseStatus::default())
        }
        Command::Server(args) => server::run(args),
        Command::Cow(cmd) => cow::run(cmd),
        Command::Get { ctl, count } => debug::get(&open(&ctl)?, count),
        Command::Put {
            ctl,
            count,
            result,
            data,
        } => debug::put(&open(&ctl)?, count, result, data.as_deref()),
        Command::Poll { ctl, timeout } => debug::poll(&open(&ctl)?, timeout),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "abusectl",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Manpages { dir } => manpages(&dir),
    }
}

/// abusectl.1 and one page per visible verb, from the clap definitions.
fn manpages(dir: &std::path::Path) -> Result<(), String> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let cmd = Cli::command();
    let write = |name: String, page: clap::Command| -> Result<(), String> {
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        clap_mangen::Man::new(page)
            .title(name.to_uppercase())
            .render(&mut out)
            .map_err(|e| e.to_string())?;
        std::fs::write(&path, out).map_err(|e| format!("{}: {e}", path.display()))
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write(format!("abusectl-{}", sub.get_name()), sub.clone())?;
    }
    write("abusectl".into(), cmd)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("abusectl: {e}");
            ExitCode::FAILURE
        }
    }
}
