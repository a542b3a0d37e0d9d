//! `abusectl cow`: create, inspect and merge cow deltas.

use std::path::PathBuf;

use abuse_servers::cow::Cow;

use crate::opts::parse_size;
use crate::progress::Progress;
use crate::status::human_size;

#[derive(clap::Subcommand)]
pub enum CowCmd {
    /// Make an empty delta over a base image.
    #[command(
        after_help = "Example:\n  abusectl cow create --base base.img --delta work.cow --block-size 64K"
    )]
    Create {
        #[arg(long)]
        base: PathBuf,
        #[arg(long)]
        delta: PathBuf,
        /// 4K to 1M, a power of two.
        #[arg(long, default_value = "64K")]
        block_size: String,
    },
    /// Show a delta: block size, mapped blocks, base identity (the base
    /// itself is not needed, unless --verify).
    #[command(
        after_help = "Examples:\n  abusectl cow info work.cow\n  abusectl cow info --verify work.cow"
    )]
    Info {
        delta: PathBuf,
        /// The base, if not the one the delta names.
        #[arg(long)]
        base: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        /// Read the whole base and check it is the one the delta was made over.
        #[arg(long)]
        verify: bool,
    },
    /// Write the delta's blocks into the base, then empty the delta.
    #[command(
        after_help = "Refused while a cow server has the delta open.\n\nExample:\n  abusectl cow merge work.cow"
    )]
    Merge {
        delta: PathBuf,
        #[arg(long)]
        base: Option<PathBuf>,
    },
}

pub fn run(cmd: CowCmd) -> Result<(), String> {
    match cmd {
        CowCmd::Create {
            base,
            delta,
            block_size,
        } => {
            let bs = parse_size(&block_size)?;
            let bs: u32 = bs
                .try_into()
                .map_err(|_| format!("block size {block_size} is too large"))?;
            let size = std::fs::File::open(&base)
                .and_then(|f| abuse_servers::blkdev::size(&f))
                .map_err(|e| format!("{}: {e}", base.display()))?;
            let p = Progress::new("reading the base", size);
            let cow = Cow::create(&base, &delta, bs, &|n| p.add(n)).map_err(|e| e.to_string())?;
            p.finish();
            println!(
                "{}: {} over {} in {} blocks",
                delta.display(),
                human_size(cow.header().virtual_size),
                cow.base_path.display(),
                human_size(bs as u64)
            );
            Ok(())
        }
        CowCmd::Info {
            delta,
            base,
            json,
            verify,
        } => {
            let i = Cow::inspect(&delta, base.as_deref()).map_err(|e| e.to_string())?;
            if verify {
                let p = Progress::new("verifying the base", i.header.base_size);
                Cow::verify(&i.header, &i.base_path, &|n| p.add(n)).map_err(|e| e.to_string())?;
                p.finish();
            }
            let (h, mapped) = (&i.header, i.mapped);
            let digest: String = h.base_digest.iter().map(|b| format!("{b:02x}")).collect();
            let state = if i.in_use { "dirty" } else { "clean" };
            let v = serde_json::json!({
                "delta": delta, "base": i.base_path, "block_size": h.block_size,
                "virtual_size": h.virtual_size, "blocks": h.nblocks(), "mapped_blocks": mapped,
                "base_size": h.base_size, "base_sha256": digest, "state": state,
                "base_verified": verify,
            });
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v).expect("serialisable")
                );
            } else {
                println!("{}", delta.display());
                println!(
                    "  base:        {} ({} bytes, sha256 {digest})",
                    i.base_path.display(),
                    h.base_size
                );
                println!("  size:        {}", human_size(h.virtual_size));
                println!("  block size:  {}", human_size(h.block_size as u64));
                println!(
                    "  mapped:      {mapped} of {} blocks ({:.1}%)",
                    h.nblocks(),
                    100.0 * mapped as f64 / h.nblocks() as f64
                );
                let why = if i.in_use {
                    "a server has it open; counts are as of its last flush"
                } else {
                    "no server has it open"
                };
                println!("  state:       {state} ({why})");
                if verify {
                    println!("  verified:    every byte of the base matches");
                }
            }
            Ok(())
        }
        CowCmd::Merge { delta, base } => {
            let cow = Cow::open_exclusive(&delta, base.as_deref()).map_err(|e| e.to_string())?;
            let base_path = cow.base_path.clone();
            let h = cow.header();
            let p = Progress::new("merging", cow.mapped_blocks() * h.block_size as u64);
            let n = cow
                .merge(&delta, &|n| p.add(n))
                .map_err(|e| e.to_string())?;
            p.finish();
            println!(
                "{}: merged {n} blocks into {}; the delta is empty",
                delta.display(),
                base_path.display()
            );
            Ok(())
        }
    }
}
