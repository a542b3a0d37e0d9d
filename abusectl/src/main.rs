//! abusectl: the user's tool for ABUSE devices.

mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use abuse_sys::Control;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "abusectl",
    version,
    about = "Set up, inspect and serve ABUSE block devices (/dev/abuseN via /dev/abctlN)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Info { ctl, json } => {
            let st = Control::open(&ctl)
                .and_then(|c| c.status())
                .map_err(|e| e.to_string())?;
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
    }
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
