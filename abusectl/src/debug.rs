//! The original ABUSE's debugging verbs: get, put, poll.

use std::path::Path;
use std::time::Duration;

use abuse_sys::uapi::*;
use abuse_sys::Control;

/// `put --result`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ResultArg {
    Ok,
    Media,
    Device,
}

use abuse_sys::cmd_name;

/// One line per request, as get and put print them.
pub fn describe(b: &AbuseBio) -> String {
    let mut flags = Vec::new();
    for (f, n) in [
        (ABUSE_BIO_FUA, "fua"),
        (ABUSE_BIO_REQUEUED, "requeued"),
        (ABUSE_BIO_NOUNMAP, "nounmap"),
    ] {
        if b.flags & f != 0 {
            flags.push(n);
        }
    }
    format!(
        "id={:#x} {} sector={} len={} flags={}",
        b.id,
        cmd_name(b.cmd),
        b.sector,
        b.len,
        if flags.is_empty() {
            "-".to_string()
        } else {
            flags.join(",")
        }
    )
}

fn fetch(ctl: &Control, count: usize) -> Result<(Vec<AbuseBio>, Vec<u8>, usize), String> {
    let count = count.clamp(1, ABUSE_MAX_BATCH as usize);
    let mut bios = vec![AbuseBio::default(); count];
    let mut buf = vec![0u8; count * (ABUSE_MAX_BIO_BYTES + ABUSE_DATA_ALIGN) as usize];
    let n = ctl
        .get_bios(&mut bios, &mut buf)
        .map_err(|e| e.to_string())?;
    if n == 0 {
        return Err(format!("{}: no request pending", ctl.path().display()));
    }
    Ok((bios, buf, n))
}

/// `get`: fetch and print; the requests go back when the file closes.
pub fn get(ctl: &Control, count: usize) -> Result<(), String> {
    let (bios, buf, n) = fetch(ctl, count)?;
    let base = buf.as_ptr() as u64;
    for b in &bios[..n] {
        println!("{}", describe(b));
        if b.cmd == ABUSE_CMD_WRITE {
            let start = (b.addr - base) as usize;
            let head = &buf[start..start + (b.len as usize).min(16)];
            let hex: Vec<String> = head.iter().map(|x| format!("{x:02x}")).collect();
            println!(
                "  data: {}{}",
                hex.join(" "),
                if b.len > 16 { " ..." } else { "" }
            );
        }
    }
    Ok(())
}

/// `put`: fetch and complete with `result`.
pub fn put(
    ctl: &Control,
    count: usize,
    result: ResultArg,
    data: Option<&Path>,
) -> Result<(), String> {
    let fill = match data {
        Some(p) => std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?,
        None => Vec::new(),
    };
    let (mut bios, mut buf, n) = fetch(ctl, count)?;
    let base = buf.as_ptr() as u64;
    for b in &mut bios[..n] {
        b.result = match result {
            ResultArg::Ok => ABUSE_RESULT_OKAY,
            ResultArg::Media => ABUSE_RESULT_MEDIA_FAILURE,
            ResultArg::Device => ABUSE_RESULT_DEVICE_FAILURE,
        };
        if b.cmd == ABUSE_CMD_READ {
            let start = (b.addr - base) as usize;
            let dst = &mut buf[start..start + b.len as usize];
            dst.fill(0);
            let k = fill.len().min(dst.len());
            dst[..k].copy_from_slice(&fill[..k]);
        }
    }
    let done = ctl.put_bios(&bios[..n]).map_err(|e| e.to_string())?;
    for b in &bios[..done] {
        println!("{} -> {:?}", describe(b), result);
    }
    Ok(())
}

/// `poll`: wait for pending requests.
pub fn poll(ctl: &Control, timeout: Option<f64>) -> Result<(), String> {
    let timeout = timeout.map(Duration::from_secs_f64);
    let ev = ctl.poll(timeout).map_err(|e| e.to_string())?;
    if ev.is_empty() {
        return Err(format!(
            "{}: no request pending after {:?}",
            ctl.path().display(),
            timeout.unwrap_or_default()
        ));
    }
    let st = ctl.status().map_err(|e| e.to_string())?;
    println!(
        "{}: {} pending, {} in flight",
        ctl.path().display(),
        st.pending,
        st.in_flight
    );
    Ok(())
}
